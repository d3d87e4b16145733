"""valet: a small asynchronous job server in one module.

A client POSTs a job that names a registered Python task and carries a JSON
payload; valet stores it, answers 202 at once, runs it on a worker thread and
keeps its status and result for the client to read.

Run it:     python valet.py [--config config.yaml] [--host H] [--port N]
Ask it:     python valet.py submit TASK --metadata '{...}' --wait   (jobs, show, ...)
Embed it:   app = Valet({"server": {"port": 0}}, tasks={"add": add}).start()
            ...
            app.stop()

Endpoints (each also answers under /api, where the original Go valet served them),
each with the Valet method that does the same for an embedding program:

    POST   /jobs                   submit(fields)          a job (run_at: later)    202
    GET    /jobs                   list_jobs(...)          ?status= ?limit= ?cursor= 200
    DELETE /jobs                   delete_jobs(...)        finished ones, in bulk    200
    GET    /jobs/{id}              job(id), wait(id, s)    one job; ?wait=S waits    200
    PATCH  /jobs/{id}              update_job(id, fields)  its name, description     204
    DELETE /jobs/{id}              delete_job(id)          one that is not running   204
    POST   /jobs/{id}/cancel       cancel(id)              one that has not finished 200
    POST   /jobs/{id}/retry        retry(id)               a FAILED or CANCELLED one 200
    POST   /jobs/retry             retry_jobs(status, ...) many of them, by status   200
    GET    /jobs/{id}/results      result(id)              a finished job's result   200
    DELETE /jobs/{id}/results      delete_result(id)       remove that result        204
    POST   /pipelines              submit_pipeline(fields) jobs run one by one       202
    GET    /pipelines              list_pipelines(...)     ?status= ?limit= ?cursor= 200
    GET    /pipelines/{id}         pipeline(id)            one, with its jobs        200
    PATCH  /pipelines/{id}         update_pipeline(id, f)  its name, description     204
    DELETE /pipelines/{id}         delete_pipeline(id)     one that is not running   204
    GET    /pipelines/{id}/jobs    pipeline_jobs(id)       its jobs, in order        200
    POST   /pipelines/{id}/cancel  cancel_pipeline(id)     what is left of it        200
    GET    /periodic               periodic()              entries and next firings  200
    GET    /tasks                  task_names()            the registered tasks      200
    GET    /status                 status()                version, queue, workers   200

A job moves SCHEDULED -> PENDING -> IN_PROGRESS -> COMPLETED | FAILED, may be
CANCELLED before it finishes, and goes back to SCHEDULED when a failed attempt
has retries left. Every move is made by the lifecycle section, through the
store's transition(), which makes it only from the statuses it is given: no race
can move a finished job back.

The sections, in order: constants, errors, config, job records, storage, the
job lifecycle, workers, scheduler, HTTP, the Valet facade, the command-line
client, main.
"""

__version__ = "0.8.0"

__all__ = [
    "Valet", "load_config", "main", "Context",
    "Store", "MemoryStore", "SqliteStore", "PostgresStore",
    "ConfigError", "ValetError", "Invalid", "NotFound", "Conflict", "BacklogFull",
    "ShuttingDown", "StorageError", "StoreInUse", "InvalidTransition",
    "SCHEDULED", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "STATUSES",
]

import argparse
import base64
import bisect
import contextlib
import datetime
import email.errors
import errno
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import importlib
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
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

# The only moves a status may make. The lifecycle refuses any other.
_MOVES = {
    SCHEDULED: {PENDING, CANCELLED},                           # due, or cancelled
    PENDING: {IN_PROGRESS, CANCELLED},
    IN_PROGRESS: {COMPLETED, FAILED, CANCELLED, SCHEDULED},    # SCHEDULED: a retry
    COMPLETED: set(),
    FAILED: {PENDING},                                         # retried by request
    CANCELLED: {PENDING},                                      # retried by request
}

# Every key of a job's JSON, in the order it is written; unset is null.
JOB_FIELDS = (
    "id", "name", "description", "task_name", "metadata", "timeout", "priority",
    "status", "failure_reason", "failure_traceback", "progress", "attempts", "max_retries",
    "retry_backoff", "run_at", "created_at", "started_at", "completed_at", "duration",
    "pipeline_id", "next_job_id", "use_previous_results",
)

# Every key of a node's JSON in /status, in order.
_NODE_FIELDS = ("name", "this", "host", "pid", "version", "started_at", "heartbeat_age")

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
_CORRUPT = "database is corrupt"  # the cause of a StorageError that waiting will not mend
_MAX_DEPTH = 64  # how deeply metadata and results may nest: far from Python's ~1000
_TIMED_OUT = "timed out after"  # how a timeout's failure reason begins (for metrics)
_MAX_TRACEBACK = 8192  # characters of a failed task's traceback kept: its last ones
MAX_WAIT = 60  # seconds: the longest GET /jobs/{id}?wait= may hold a request
_SETTLE_WAIT = 5    # seconds a cancel waits for another thread to write a job's end
_PURGE_BATCH = 500  # finished jobs deleted in one write, by retention or a bulk delete
_SWEEP_EVERY = 60   # seconds between retention's sweeps, while there is nothing to delete


# ------------------------------------------------------------------- errors --

class ConfigError(ValueError):
    """An invalid configuration: the message names the key, the value and what is allowed."""


class InvalidTransition(RuntimeError):
    """A status move that the table of allowed moves forbids (a bug in the caller)."""


class ValetError(Exception):
    """Why valet cannot do what it was asked, in words for whoever asked. Valet's
    methods raise its subclasses; the HTTP API answers each with its own status
    code and the same message."""


class Invalid(ValetError):
    """A job, pipeline, change or query with fields that are wrong (HTTP 400); the
    message names every one of them."""


class NotFound(ValetError):
    """No job or pipeline has that id, or the job has no result (HTTP 404)."""


class Conflict(ValetError):
    """The job or pipeline is in a status that forbids it: running, finished, part of
    a pipeline (HTTP 409)."""


class BacklogFull(ValetError):
    """worker_pool.queue_capacity jobs are already waiting for a worker; try again
    shortly (HTTP 503 with Retry-After)."""


class StorageError(ValetError):
    """The store cannot read or write now: `cause` says why in a few words ("disk is
    full", "database is read-only", "database is locked", "database is corrupt").
    Nothing was changed; the same call may succeed once the fault clears."""

    def __init__(self, cause, detail=""):
        self.cause = cause
        self.detail = detail if detail != cause else ""
        then = ("it needs repair: restore a backup (README: Guarantees)"
                if cause == _CORRUPT else "try again later")
        super().__init__(f"storage is failing: {cause}; {then}"
                         + (f" ({self.detail})" if self.detail else ""))


class StoreInUse(RuntimeError):
    """Another store (in this process or another) owns the database file."""


class ShuttingDown(ValetError):
    """valet is stopping, or has stopped: it takes no more work (HTTP 503)."""


def _not_found(what, item_id):
    """The NotFound for a job or pipeline that is not there."""
    return NotFound(f"{what} {item_id!r} not found")


def _shutting_down():
    return ShuttingDown("valet is shutting down")


def _show(value, limit=60):
    """A value as JSON for an error message, cut short: it came from a user, who
    may have sent a megabyte of it."""
    try:
        text = json.dumps(value, default=repr)
    except RecursionError:
        return "(a value nested too deeply to show)"
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------- config --

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    # An int is always finite; math.isfinite() would overflow on a 400-digit one.
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (isinstance(v, int) or math.isfinite(v)))


def _is_seconds(low, high):
    """A check for a number of seconds in (low, high]."""
    return lambda v: _is_number(v) and low < v <= high


_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_seconds(value):
    """The seconds of a duration written as seconds (90) or a number and a unit
    (1500ms, 30s, 5m, 2h, 1d), from 1 second to a year; ValueError if it is not one."""
    if _is_number(value):
        seconds = value
    else:
        found = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
        if found is None:
            raise ValueError(f"{_show(value)} is not an interval; give seconds (90) "
                             f"or a number and a unit: 90s, 5m, 2h, 1d")
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2) or "s"]
    if not 1 <= seconds <= _MAX_TIMEOUT_SECONDS:
        raise ValueError(f"{_show(value)} is not allowed; an interval runs from 1 "
                         f"second to a year")
    return seconds


def _is_token(v):
    return v is None or (isinstance(v, str) and _TOKEN.fullmatch(v) is not None)


def _is_names(v):
    return isinstance(v, list) and all(isinstance(n, str) and n.strip() for n in v)


def _is_duration(v):
    if v is None:
        return True
    try:
        _duration_seconds(v)
    except ValueError:
        return False
    return True


_TOKEN = re.compile(r"[\x21-\x7e]{16,512}")  # printable ASCII, no spaces: a header value


def _choice(*options):
    return (lambda v: v in options), " or ".join(options)


# key -> (default, check, what is allowed). config.yaml documents each key.
# "periodic" has no check here: _periodic_entries() checks and parses it, once.
_SCHEMA = {
    "server.host": ("127.0.0.1", lambda v: isinstance(v, str) and v != "",
                    "a host name or IP address"),
    "server.port": (8080, lambda v: _is_int(v) and 0 <= v <= 65535,
                    "an integer from 0 to 65535 (0 picks a free port)"),
    "server.max_body_bytes": (1048576, lambda v: _is_int(v) and 1024 <= v <= 2**31,
                              "an integer from 1024 to 2147483648"),
    "server.auth_token": (None, _is_token, "null, or 16 to 512 printable ASCII characters "
                          "without spaces (python -c 'import secrets; "
                          "print(secrets.token_urlsafe())' makes one)"),
    "server.allowed_hosts": (None, lambda v: v is None or v == "*" or _is_names(v),
                             "null (the default list), \"*\" (any) or a list of host "
                             "names such as [jobs.example]"),
    "server.cors_origins": ([], lambda v: v == "*" or _is_names(v),
                            "a list of origins such as [\"https://app.example\"], or "
                            "\"*\" (any)"),
    "server.backlog": (1024, lambda v: _is_int(v) and 1 <= v <= 65535,
                       "an integer from 1 to 65535"),
    "server.max_connections": (512, lambda v: _is_int(v) and 1 <= v <= 100000,
                               "an integer from 1 to 100000"),
    "server.request_timeout": (10, _is_seconds(0, 3600), "a number of seconds from 0 "
                               "(not included) to 3600"),
    "server.keepalive_timeout": (30, _is_seconds(0, 3600), "a number of seconds from 0 "
                                 "(not included) to 3600"),
    "worker_pool.workers": (4, lambda v: _is_int(v) and 1 <= v <= 256,
                            "an integer from 1 to 256"),
    "worker_pool.queue_capacity": (1000, lambda v: _is_int(v) and v >= 1,
                                   "an integer >= 1"),
    "worker_pool.shutdown_grace": (10, lambda v: _is_number(v) and 0 <= v <= 86400,
                                   "a number of seconds from 0 to 86400"),
    "worker_pool.default_timeout": (None, lambda v: v is None or _is_seconds(
                                        0, _MAX_TIMEOUT_SECONDS)(v),
                                    f"null or a number of seconds greater than 0 and "
                                    f"at most {_MAX_TIMEOUT_SECONDS}"),
    "worker_pool.worker_type": ("thread", *_choice("thread", "process")),
    "worker_pool.kill_grace": (2, lambda v: _is_number(v) and 0 <= v <= 3600,
                               "a number of seconds from 0 to 3600"),
    "worker_pool.max_jobs_per_child": (None, lambda v: v is None or (_is_int(v) and v >= 1),
                                       "null or an integer >= 1"),
    "worker_pool.max_memory_per_child": (None, lambda v: v is None or (
                                             _is_int(v) and 16 <= v <= 2**20),
                                         "null or a number of megabytes from 16 to "
                                         "1048576"),
    "storage.option": ("sqlite", *_choice("sqlite", "memory", "postgres")),
    "storage.sqlite.path": ("valet.db",
                            lambda v: isinstance(v, str) and v not in ("", ":memory:"),
                            "a file path (for no file, use storage.option: memory)"),
    "storage.sqlite.synchronous": ("full", *_choice("full", "normal")),
    "storage.postgres.dsn": (None, lambda v: v is None or (isinstance(v, str) and v != ""),
                             "a libpq connection string, such as \"host=db.internal "
                             "dbname=valet user=valet\" or \"postgresql://valet@db/valet\""),
    "storage.postgres.schema": ("valet", lambda v: isinstance(v, str) and re.fullmatch(
                                    r"[a-z_][a-z0-9_]{0,56}", v) is not None,
                                "a lowercase SQL name of up to 57 letters, digits and _"),
    "storage.postgres.node": (None, lambda v: v is None or (
                                  isinstance(v, str) and 0 < len(v) <= 200 and v.isprintable()),
                              "null (this host's name and port) or a name of up to 200 "
                              "printable characters"),
    "storage.postgres.heartbeat": (5, _is_seconds(0, 3600),
                                   "a number of seconds from 0 (not included) to 3600"),
    "storage.postgres.node_timeout": (30, _is_seconds(0, 86400),
                                      "a number of seconds from 0 (not included) to 86400"),
    "storage.postgres.poll": (1, _is_seconds(0, 3600),
                              "a number of seconds from 0 (not included) to 3600"),
    "storage.postgres.listen": (True, lambda v: isinstance(v, bool), "true or false"),
    "storage.postgres.connections": (10, lambda v: _is_int(v) and 1 <= v <= 1000,
                                     "an integer from 1 to 1000"),
    "tasks_module": ("tasks", lambda v: isinstance(v, str) and v != "",
                     "an importable module name"),
    "retention.finished_jobs": ("7d", _is_duration, "null (keep every job) or a "
                                "duration from 1 second to a year, such as 12h, 7d or 90m"),
    "timeout_unit": ("second", *_choice("second", "millisecond")),
    "logging_format": ("text", *_choice("text", "json")),
    "logging_level": ("info", *_choice("debug", "info", "warning", "error")),
    "periodic": ([], None, "a list of entries, each with name, task_name and cron or every"),
}


class _Config(dict):
    """A validated config: a dict of every dotted key to its value. `folder` is the
    folder of the file it was read from (None when it came from a dict): a relative
    storage.sqlite.path and the tasks_module are looked for there."""

    folder = None
    token_from = "server.auth_token"  # where the token came from, for messages


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


def _read_yaml(path):
    """The mapping in a YAML file; ConfigError if it cannot be read or is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: "
                          f"{exc}".replace("\n", " ")) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {os.fspath(path)!r}: expected a mapping of keys, "
                          f"got {type(tree).__name__}")
    return tree


def load_config(source=None, overrides: dict | None = None,
                environ: dict | None = None) -> dict:
    """Return a validated config: a dict of every dotted key to its value.

    `source` is None (all defaults), a path to a YAML file, or a dict shaped like
    config.yaml (nested sections or dotted keys), such as an earlier result.
    `overrides`, shaped the same way, win over the source, and the variable
    VALET_AUTH_TOKEN of `environ` (main() passes os.environ; an embedding program
    passes its own, or nothing) wins over both. A relative
    storage.sqlite.path, and the tasks_module, are looked for in the folder of the
    file (and, with a dict, in the working directory). Raises ConfigError naming
    the key, the value and what is allowed; a file that cannot be read or parsed
    is a ConfigError too.
    """
    config = _Config({key: default for key, (default, _, _) in _SCHEMA.items()})
    if isinstance(source, (str, os.PathLike)):
        tree = _read_yaml(source)
        config.folder = os.path.dirname(os.path.abspath(source))
    else:
        tree = source or {}
        config.folder = getattr(source, "folder", None)
        config.token_from = getattr(source, "token_from", config.token_from)
    given = _flatten(tree)
    given.update(_flatten(overrides or {}))
    if (environ or {}).get("VALET_AUTH_TOKEN"):  # so the secret need not sit in a file
        given["server.auth_token"] = environ["VALET_AUTH_TOKEN"]
        config.token_from = "VALET_AUTH_TOKEN"
    if (environ or {}).get("VALET_POSTGRES_DSN"):  # (which may hold a password)
        given["storage.postgres.dsn"] = environ["VALET_POSTGRES_DSN"]
    problems = []
    for key, value in given.items():
        if key not in _SCHEMA:
            problems.append(f"{key}: unknown key; known keys are {', '.join(_SCHEMA)}")
            continue
        _, check, allowed = _SCHEMA[key]
        if check is not None and not check(value):
            problems.append(f"{key} (or VALET_AUTH_TOKEN): the token given is not allowed "
                            f"(it is not shown here); expected {allowed}"
                            if key == "server.auth_token" else
                            f"{key}: {_show(value)} is not allowed; expected {allowed}")
        config[key] = value
    problems += _process_problems(config, given) + _postgres_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    config["periodic"] = _periodic_entries(config["periodic"])
    return config


def _process_problems(config, given):
    """What is wrong with the settings of worker processes, given the rest (`given`:
    the keys set)."""
    problems = []
    if config["worker_pool.worker_type"] == "thread":
        problems += [f"{key}: {_show(config[key])} applies to worker processes only; set "
                     f"worker_pool.worker_type: process, or leave {key} out"
                     for key in ("worker_pool.kill_grace", "worker_pool.max_jobs_per_child",
                                 "worker_pool.max_memory_per_child")
                     if key in given and config[key] != _SCHEMA[key][0]]
    if config["worker_pool.max_memory_per_child"] is not None and sys.platform == "win32":
        problems.append("worker_pool.max_memory_per_child: Windows has no limit of a "
                        "process's memory that valet can set; leave it null")
    return problems


def _postgres_problems(config):
    """What is wrong with the settings of a store shared by several nodes."""
    if config["storage.option"] != "postgres":
        return []
    problems = []
    if config["storage.postgres.dsn"] is None:
        problems.append("storage.postgres.dsn: null is not allowed with storage.option: "
                        "postgres; give the database to use (or set VALET_POSTGRES_DSN)")
    if config["storage.postgres.node_timeout"] < 2 * config["storage.postgres.heartbeat"]:
        problems.append(f"storage.postgres.node_timeout: "
                        f"{_show(config['storage.postgres.node_timeout'])} is not allowed; "
                        f"expected at least twice storage.postgres.heartbeat "
                        f"({config['storage.postgres.heartbeat']:g}s), or a node that is "
                        f"alive would be taken for dead")
    return problems


def _in_folder(config, path):
    """A path from the config, made absolute against the config file's folder."""
    return os.path.join(config.folder or os.getcwd(), os.fspath(path))


def _load_tasks(config):
    """Import the tasks_module (looked for first in the config file's folder) and
    return its TASKS dict; ConfigError if it cannot. A module is imported once per
    process: a second Valet naming the same module gets the same one."""
    module_name, folder = config["tasks_module"], config.folder
    if folder is not None:  # where the config is, its tasks are: look there first
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        where = f" (looked for first in {folder})" if folder is not None else ""
        frames = traceback.extract_tb(exc.__traceback__)
        line = (f" ({frames[-1].filename}, line {frames[-1].lineno})"
                if frames and not isinstance(exc, (SyntaxError, ImportError)) else "")
        raise ConfigError(f"tasks_module: {module_name!r} cannot be imported{where}: "
                          f"{type(exc).__name__}: {exc}{line}") from None
    tasks = getattr(module, "TASKS", None)
    if not isinstance(tasks, dict):
        found = "no TASKS" if tasks is None else f"a TASKS that is a {type(tasks).__name__}"
        raise ConfigError(f"tasks_module: {module_name!r} has {found}; it needs a TASKS "
                          f"dict mapping names to functions")
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


def _duration(started, completed):
    """Milliseconds from start to end, or None until both are known."""
    if started is None or completed is None:
        return None
    return round((completed - started) * 1000, 3)


def _job_json(job, progress=None):
    """The public form of a stored job record: every key of JOB_FIELDS, in order.
    `progress` is what its task last reported, while it runs."""
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
        "failure_traceback": job["failure_traceback"],
        "progress": progress if job["status"] == IN_PROGRESS else None,
        "attempts": job["attempts"],
        "max_retries": job["max_retries"],
        "retry_backoff": job["retry_backoff"],
        "run_at": _rfc3339(job["run_at"]),
        "created_at": _rfc3339(job["created_at"]),
        "started_at": _rfc3339(job["started_at"]),
        "completed_at": _rfc3339(job["completed_at"]),
        "duration": _duration(job["started_at"], job["completed_at"]),
        "pipeline_id": job["pipeline_id"],
        "next_job_id": job["next_job_id"],
        "use_previous_results": bool(job["use_previous_results"]),
    }


# JSON as valet writes it: no NaN or Infinity, which other parsers refuse. Made once:
# a JSONEncoder built per call costs more than a small job's whole encoding.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


class _JsonObject(dict):
    """An object the HTTP layer's strict decoder built from a request body: whatever
    it holds is plain JSON already, so a job made from it is not encoded again to
    check (a dict from an embedding program is). `shallow` is set on a body too
    short of brackets to nest past _MAX_DEPTH."""

    shallow = False

_JOB_INPUT = ("name", "description", "task_name", "metadata", "task_params", "timeout",
              "priority", "run_at", "max_retries", "retry_backoff")
_PIPELINE_JOB_INPUT = ("name", "description", "task_name", "metadata", "task_params",
                       "timeout", "max_retries", "retry_backoff", "use_previous_results")
_PIPELINE_INPUT = ("name", "description", "priority", "run_at", "jobs")


class _Fields:
    """Checks the fields of a body one by one, keeping a problem for each field that
    is wrong, so that one error names them all. Each check returns the value to
    use (the default when a field is absent or wrong); `where` prefixes every
    problem ("jobs[1]: ")."""

    def __init__(self, fields, where=""):
        self.fields = fields
        self.where = where
        self.problems = []

    def problem(self, message):
        self.problems.append(f"{self.where}{message}")

    def raise_problems(self):
        """Invalid naming every problem found, if there is any."""
        if self.problems:
            raise Invalid("; ".join(self.problems))

    def unknown(self, allowed, what):
        unknown = [key for key in self.fields if key not in allowed]
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            self.problem(f"unknown field{'s' if len(unknown) > 1 else ''} {names}; {what} "
                         f"takes {', '.join(allowed)}")

    def text(self, key, required):
        value = self.fields.get(key)
        if value is None and not required:
            return None
        if key not in self.fields:
            self.problem(f"{key} is required")
        elif not isinstance(value, str) or (required and not value.strip()):
            kind = "a non-empty string" if required else "a string or null"
            self.problem(f"{key} must be {kind}, got {_show(value)}")
        elif "\0" in value:  # (which PostgreSQL cannot store, and no one means)
            self.problem(f"{key} must not contain NUL (\\u0000) characters")
        else:
            return value
        return None

    def number(self, key, default, check, expected):
        value = self.fields.get(key)
        if value is None:
            return default
        if not check(value):
            self.problem(f"{key} must be {expected}, got {_show(value)}")
            return default
        return value

    def priority(self):
        return self.number("priority", 0, _is_priority, _PRIORITIES)

    def timeout(self, unit):
        longest = _MAX_TIMEOUT_SECONDS * (1000 if unit == "millisecond" else 1)
        return self.number("timeout", None, lambda v: _is_number(v) and 0 < v <= longest,
                           f"a number greater than 0 and at most {longest} (in {unit}s)")

    def metadata(self):
        """The job's payload ("task_params" is its old name), which must be plain JSON:
        an embedding program may hand valet what JSON cannot hold."""
        value = self.fields.get("metadata", self.fields.get("task_params"))
        if "metadata" in self.fields and "task_params" in self.fields:
            self.problem("give metadata or task_params (its old name), not both")
        if not getattr(self.fields, "shallow", False) and _too_deep(value):
            self.problem(f"metadata is nested more than {_MAX_DEPTH} levels deep")
            return None
        if isinstance(self.fields, _JsonObject):
            return value
        try:
            _ENCODER.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            self.problem(f"metadata must be plain JSON: {exc}")
            return None
        return value

    def flag(self, key):
        value = self.fields.get(key, False)
        if not isinstance(value, bool):
            self.problem(f"{key} must be true or false, got {_show(value)}")
            return False
        return value

    def time(self, key):
        """An RFC 3339 time (run_at, a listing's created_after), as epoch seconds."""
        value = self.fields.get(key)
        if value is None:
            return None
        if not (isinstance(value, str) and _RFC3339.fullmatch(value)):
            self.problem(f"{key} must be an RFC 3339 time such as \"2026-11-28T09:30:00Z\", "
                         f"got {_show(value)}")
            return None
        try:
            when = _parse_time(value)
            _rfc3339(when)  # in UTC too, it must fall within years 1 to 9999
        except (ValueError, OverflowError, OSError) as exc:
            self.problem(f"{key} {_show(value)} is not a real time: {exc}")
            return None
        return when

    def task_name(self, tasks):
        task_name = self.fields.get("task_name")
        if "task_name" not in self.fields:
            self.problem("task_name is required")
        elif not isinstance(task_name, str):
            self.problem(f"task_name must be a string, got {_show(task_name)}")
        elif tasks is not None and task_name not in tasks:
            self.problem(f"task_name {task_name!r} is not a registered task; registered "
                         f"tasks: {', '.join(sorted(tasks)) or '(none)'}")
        else:
            return task_name
        return None


def _too_deep(value, limit=_MAX_DEPTH):
    """Whether arrays and objects nest more than `limit` levels deep in `value`
    (walked without recursion, so any depth is safe to ask about)."""
    level = [value]
    for _ in range(limit):
        level = [item for v in level if isinstance(v, (dict, list))
                 for item in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return False
    return any(isinstance(v, (dict, list)) for v in level)


_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # an Idempotency-Key: printable ASCII


def _digest(kind, fields):
    """What identifies a request for its idempotency key: its kind and its body."""
    text = json.dumps([kind, fields], sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _check_key(key):
    if not (isinstance(key, str) and _KEY.fullmatch(key)):
        raise Invalid(f"Idempotency-Key must be 1 to 255 printable ASCII characters "
                      f"without spaces, got {_show(key)}")


def _is_priority(v):
    return _is_int(v) and abs(v) <= _MAX_PRIORITY


def _is_retries(v):
    return _is_int(v) and 0 <= v <= _MAX_RETRIES


def _is_backoff(v):
    return _is_number(v) and 0 <= v <= _MAX_BACKOFF


_PRIORITIES = f"an integer from -{_MAX_PRIORITY} to {_MAX_PRIORITY}"
_RETRIES = f"an integer from 0 to {_MAX_RETRIES}"
_BACKOFFS = f"a number of seconds from 0 to {_MAX_BACKOFF:g}"


def _new_job(fields, tasks, timeout_unit, now, allowed=_JOB_INPUT, where=""):
    """Validate a submitted job body and build its record; Invalid names every field
    that is wrong.

    `tasks` None skips the check that task_name is registered; `where` prefixes
    every message ("jobs[1]: "), for a job inside a pipeline or a config entry.
    """
    if not isinstance(fields, dict):
        raise Invalid(f"{where}a job must be a JSON object, got {_show(fields)}")
    check = _Fields(fields, where)
    job = _job_record(check, tasks, timeout_unit, now, allowed)
    check.raise_problems()
    return job


def _job_record(check, tasks, timeout_unit, now, allowed):
    """A new job's record from the fields `check` holds, its problems kept there."""
    check.unknown(allowed, "a pipeline job" if allowed is _PIPELINE_JOB_INPUT else "a job")
    return {
        "id": str(uuid.uuid4()),
        "name": check.text("name", required=True),
        "description": check.text("description", required=False),
        "task_name": check.task_name(tasks),
        "metadata": check.metadata(),
        "timeout": check.timeout(timeout_unit),
        "priority": check.priority(),
        "status": PENDING,  # until the lifecycle accepts it
        "failure_reason": None,
        "failure_traceback": None,
        "attempts": 0,
        "max_retries": check.number("max_retries", 0, _is_retries, _RETRIES),
        "retry_backoff": check.number("retry_backoff", _DEFAULT_BACKOFF, _is_backoff,
                                      _BACKOFFS),
        "run_at": check.time("run_at"),
        "created_at": now, "started_at": None, "completed_at": None,
        "pipeline_id": None, "previous_job_id": None, "next_job_id": None,
        "use_previous_results": (check.flag("use_previous_results")
                                 if "use_previous_results" in allowed else False),
    }


def _new_pipeline(fields, tasks, timeout_unit, now):
    """Validate a submitted pipeline body: (pipeline record, its job records in order).
    Invalid names every field that is wrong, in the pipeline and in each job."""
    if not isinstance(fields, dict):
        raise Invalid(f"a pipeline must be a JSON object, got {_show(fields)}")
    check = _Fields(fields)
    check.unknown(_PIPELINE_INPUT, "a pipeline")
    pipeline = {"id": str(uuid.uuid4()), "name": check.text("name", required=True),
                "description": check.text("description", required=False),
                "priority": check.priority(), "run_at": check.time("run_at"),
                "created_at": now}
    specs = fields.get("jobs")
    if not isinstance(specs, list) or not 2 <= len(specs) <= _MAX_PIPELINE_JOBS:
        got = (f"{len(specs)} job{'' if len(specs) == 1 else 's'}"
               if isinstance(specs, list) else _show(specs))
        hint = "; submit a single job with POST /jobs" if got == "1 job" else ""
        check.problem(f"jobs must be a list of 2 to {_MAX_PIPELINE_JOBS} jobs, got {got}{hint}")
        specs = []
    jobs = [_pipeline_job(check, spec, i, tasks, timeout_unit, now)
            for i, spec in enumerate(specs)]
    check.raise_problems()
    for i, job in enumerate(jobs):
        job.update(pipeline_id=pipeline["id"], priority=pipeline["priority"])
        if i == 0:  # the pipeline's run_at is its first job's
            job["run_at"] = pipeline["run_at"]
        else:
            job["previous_job_id"] = jobs[i - 1]["id"]
            jobs[i - 1]["next_job_id"] = job["id"]
    return pipeline, jobs


def _pipeline_job(check, spec, i, tasks, timeout_unit, now):
    """One job of a submitted pipeline, its problems added to the pipeline's `check`."""
    where = f"jobs[{i}]: "
    if not isinstance(spec, dict):
        check.problem(f"{where}a job must be a JSON object, got {_show(spec)}")
        return None
    own = _Fields(spec, where)
    job = _job_record(own, tasks, timeout_unit, now, _PIPELINE_JOB_INPUT)
    if i == 0 and job["use_previous_results"]:
        own.problem("use_previous_results cannot be true for the first job: it has no "
                    "previous job")
    elif (job["use_previous_results"] and job["task_name"] is not None
          and not _takes_previous(tasks[job["task_name"]])):
        own.problem(f"task {job['task_name']!r} cannot take the previous result: with "
                    f"use_previous_results it is called as fn(metadata, previous_result)")
    check.problems += own.problems
    return job


def _takes_context(fn):
    """True if fn accepts a `context` keyword argument."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "context" and p.kind != p.POSITIONAL_ONLY
               or p.kind == p.VAR_KEYWORD for p in parameters)


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


def _changes(fields, what, known):
    """The name/description changes a PATCH body asks for, or Invalid naming every
    field that is wrong."""
    if not isinstance(fields, dict):
        raise Invalid(f"a change must be a JSON object, got {_show(fields)}")
    check = _Fields(fields)
    refused = [f"unknown field {key!r}" if key not in known else
               f"field {key!r} cannot be changed"
               for key in fields if key not in ("name", "description")]
    if refused:
        check.problem(f"{'; '.join(refused)}; a PATCH of a {what} may change only name and "
                      f"description")
    changes = {}
    if "name" in fields:
        changes["name"] = check.text("name", required=True)
    if "description" in fields:
        changes["description"] = check.text("description", required=False)
    check.raise_problems()
    return changes


_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a 64-bit integer


def _page(status, limit, cursor, order="asc", task_name=None, name=None,
          created_after=None, created_before=None):
    """A listing's (status, limit, cursor seq, the rest of its query for
    Store.list) from what the caller gave, or Invalid naming every one that is
    wrong. `limit` is an integer (or its digits, from a query); `cursor` is a
    next_cursor from an earlier page; `order` asc or desc (newest first)."""
    check = _Fields({"created_after": created_after, "created_before": created_before})
    query = {"created_after": check.time("created_after"),
             "created_before": check.time("created_before"),
             "newest_first": isinstance(order, str) and order.lower() == "desc"}
    if None not in (query["created_after"], query["created_before"]) and (
            query["created_after"] >= query["created_before"]):
        check.problem("created_after must be earlier than created_before")
    if not (isinstance(order, str) and order.lower() in ("asc", "desc")):
        check.problem(f"order must be asc or desc, got {_show(order)}")
    for key, value in (("task_name", task_name), ("name", name)):
        if value is not None and not isinstance(value, str):
            check.problem(f"{key} must be a string, got {_show(value)}")
        query[key] = value
    if status is not None:
        if not isinstance(status, str) or status.upper() not in STATUSES:
            check.problem(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        status = status.upper() if isinstance(status, str) else None
    size = int(limit) if isinstance(limit, str) and _DIGITS.fullmatch(limit) else limit
    if not (_is_int(size) and 1 <= size <= MAX_PAGE_SIZE):
        check.problem(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, got {limit!r}")
    if cursor is not None and not (isinstance(cursor, str) and _DIGITS.fullmatch(cursor)):
        check.problem(f"cursor must be a next_cursor from an earlier page, got {cursor!r}")
    check.raise_problems()
    return status, size, int(cursor or 0), query


def _bulk_filter(status, finished_before):
    """The (statuses, epoch second or None) of a bulk delete's filter, or Invalid."""
    if status is None and finished_before is None:
        raise Invalid("give status, finished_before or both: which finished jobs to delete")
    problems, statuses, before = [], FINISHED, None
    if isinstance(status, str):
        status = status.upper()  # as in a listing: ?status=failed works
    if status is not None and status not in FINISHED:
        problems.append(f"status must be COMPLETED, FAILED or CANCELLED (jobs that have not "
                        f"finished are never deleted in bulk), got {_show(status)}")
    elif status is not None:
        statuses = (status,)
    times = _Fields({"finished_before": finished_before})
    before = times.time("finished_before")
    problems += times.problems
    if problems:
        raise Invalid("; ".join(problems))
    return statuses, before


def _next_cursor(found, limit):
    """The next_cursor of a page read with limit + 1: None when that was the last."""
    return str(found[limit - 1]["seq"]) if len(found) > limit else None


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


def _pipeline_json(pipeline, job_json=_job_json):
    """The public form of a pipeline record (with its job records, in order): every
    key of PIPELINE_FIELDS, in order, with each job written by `job_json`."""
    jobs = pipeline["jobs"]
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
        "duration": _duration(started, completed),
        "jobs": [job_json(job) for job in jobs],
    }


# ------------------------------------------------------------------ storage --

# The fields a transition may write besides the status, and those update() may.
_MOVE_FIELDS = frozenset(("attempts", "started_at", "completed_at", "failure_reason",
                          "failure_traceback", "run_at"))
_EDITABLE_FIELDS = frozenset(("name", "description"))
_STATUS_SET = frozenset(STATUSES)


def _check_fields(fields, allowed, what):
    if fields and not allowed.issuperset(fields):
        unknown = sorted(set(fields) - allowed)
        raise ValueError(f"{what} cannot write the field {unknown[0]!r}; it writes "
                         f"{', '.join(sorted(allowed))}")


def _check_moves(moves):
    """ValueError for a move (job id, from_states, to_state, fields) that no store
    may make, before any of them is made."""
    for _, from_states, to_state, fields in moves:
        _check_fields(fields, _MOVE_FIELDS, "a transition")
        if to_state not in _STATUS_SET or not _STATUS_SET.issuperset(from_states):
            raise ValueError(f"a move from {from_states} to {to_state!r} names a status "
                             f"that is not one of {', '.join(STATUSES)}")


def _checked_move(move):
    """A move of transitions(), checked (ValueError), with its optional parts: (id,
    from_states, to_state, fields, result, then)."""
    job_id, from_states, to_state, fields, result, then = (*move, *(None, None, ())[
        len(move) - 3:])
    _check_moves(((job_id, from_states, to_state, fields), *then))
    return job_id, from_states, to_state, fields, result, then


def _check_finished(statuses):
    if not statuses or not set(statuses) <= set(FINISHED):
        raise ValueError(f"purge() deletes only finished jobs: statuses must be some of "
                         f"{', '.join(FINISHED)}, not {statuses!r}")


def _kind(kind):
    if kind not in ("job", "pipeline"):
        raise ValueError(f"kind must be job or pipeline, got {kind!r}")
    return kind


def _check_new(jobs):
    """ValueError for new job records that no store may add."""
    for job in jobs:
        if job["status"] not in _STATUS_SET:
            raise ValueError(f"{job['status']!r} is not a status")
    if len(jobs) > 1 and len({job["id"] for job in jobs}) < len(jobs):
        raise ValueError("a job id is given twice")


class Store:
    """What valet needs of a storage backend: it persists jobs, pipelines, results and
    periodic firings, and answers queries. It decides nothing: the lifecycle says
    which status a job moves to, from which, and with what (attempts, times,
    results, the jobs of its pipeline that move with it).

    Records are plain dicts with exactly these keys, as add() is given them and as
    every method returns them (with "seq", below):

        job       id, name, description, task_name, metadata (any JSON value),
                  timeout, priority, status (one of STATUSES), failure_reason,
                  failure_traceback, attempts, max_retries, retry_backoff, run_at,
                  created_at, started_at, completed_at, pipeline_id,
                  previous_job_id, next_job_id, use_previous_results (a bool)
        pipeline  id, name, description, priority, run_at, created_at

    Times are epoch seconds (floats) or None. A store gives every value back as it
    was given: an int stays an int and a float a float (timeout and retry_backoff
    may be either). It adds "seq" to every record it returns: a positive integer
    below 10**18, the record's place in submission order, which never changes and
    is never used again, not even after the newest record is deleted. A record
    returned is the caller's own: changing it changes nothing stored.

    Every method is thread-safe. Every write is atomic, all of it or none of it,
    and has committed when it returns; a write that raises has written nothing.
    A method that cannot reach its storage (a full disk, a read-only or corrupt
    file) raises StorageError with the cause.
    A method that finds no such job or pipeline returns None (False for those
    that answer whether they wrote). No method may be called after close(). To
    add a backend, implement every method below; the storage-contract tests in
    test_valet.py check an implementation against this text.
    """

    option = None  # the storage.option that names this store
    errors = 0     # calls that met a storage fault (raised StorageError), since it opened

    def add(self, *jobs, pipeline=None, fired=None, key=None) -> bool:
        """Store new job records, in the order given (a pipeline's jobs in their
        order, each with its pipeline_id); with `pipeline`, that pipeline record
        too. An id already stored, or given twice, raises an error. `fired`,
        (periodic entry name, due time), records a periodic firing with the jobs:
        if a firing of that entry at that due time or later is already recorded,
        nothing is stored and add returns False. `key`, (idempotency key, request
        digest), records the key for the pipeline, or else the one job: if that
        key is stored already, nothing is stored and add returns False. Returns
        True once stored."""
        raise NotImplementedError

    def find_key(self, key) -> dict | None:
        """What an idempotency key created: {"kind": "job" or "pipeline", "id",
        "digest"}, or None. A key goes when what it created is deleted."""
        raise NotImplementedError

    def purge(self, before, statuses=FINISHED, limit=500, pipelines=False) -> int:
        """Delete up to `limit` finished jobs that are not in a pipeline, whose status
        is one of `statuses` and whose completed_at is before `before` (any, if
        None), with their results and idempotency keys, oldest first. With
        pipelines=True, also delete the pipelines whose jobs have all finished
        before `before`, with their jobs. Returns how many jobs it deleted: fewer
        than `limit` when no more are due."""
        raise NotImplementedError

    def get(self, job_id) -> dict | None:
        """The job's record, or None."""
        raise NotImplementedError

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE, newest_first=False,
             task_name=None, name=None, created_after=None, created_before=None) -> list:
        """The first `limit` job records in seq order with seq > `after` (with
        newest_first, in reverse order with seq < `after`, or from the newest when
        `after` is 0), fewer only when no more follow. Only those with this status,
        task_name and name, and created_at after `created_after` and before
        `created_before` (epoch seconds), where given."""
        raise NotImplementedError

    def transition(self, job_id, from_states, to_state, fields=None, result=None,
                   then=()) -> dict | None:
        """Move the job to `to_state` if its status is one of `from_states`, writing
        `fields` (only these: attempts, started_at, completed_at, failure_reason,
        failure_traceback, run_at) with it. With it, in the same write: store
        `result`, a (value, error) pair, as the job's result (or, with result=(),
        delete its result); and make each move of `then`, a list of (job id,
        from_states, to_state, fields), where that job's status matches.
        Returns the moved record; None, writing nothing (no result, no further
        move), if the job is missing or not in one of `from_states`. Two
        transitions of one job from the same status can never both succeed. A
        field outside those five, or a status outside STATUSES, in any move is a
        ValueError. (Every store has this: it is transitions() of one move.)"""
        return self.transitions((job_id, from_states, to_state, fields, result, then))[0]

    def transitions(self, *moves) -> list:
        """Make several transitions in one write (one commit on SQLite), in order, as
        transition() makes one: each move is a tuple of transition()'s arguments,
        (job id, from_states, to_state[, fields[, result[, then]]]). Returns each
        move's record, or None where it did not apply (the others apply all the
        same). A worker so writes a job's end with its next job's start. (A store
        written before 0.7.0, with transition() alone, gets this: one write each.)"""
        if type(self).transition is Store.transition:
            raise NotImplementedError
        return [self.transition(*_checked_move(move)) for move in moves]

    def update(self, item_id, fields, kind="job") -> bool:
        """Write name and/or description (ValueError for any other field) of the job,
        or with kind="pipeline" the pipeline; False if there is none."""
        raise NotImplementedError

    def delete(self, job_id, allowed) -> dict | None:
        """Delete the job and its result if allowed(record) is true of its record as
        it is at the moment of deleting. Returns that record (deleted or not), or
        None. `allowed` must only look at the record: it may be called twice."""
        raise NotImplementedError

    def result(self, job_id) -> dict | None:
        """The job's result as {"value": ..., "error": ...}, or None if it has none."""
        raise NotImplementedError

    def delete_result(self, job_id) -> bool:
        """Delete the job's result; False if it had none."""
        raise NotImplementedError

    def get_pipeline(self, pipeline_id) -> dict | None:
        """The pipeline's record with "jobs", its job records in order, read together
        (a write cannot fall between them), or None."""
        raise NotImplementedError

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE) -> list:
        """The first `limit` pipeline records with seq > `after`, in seq order (fewer
        only when no more follow), each with "jobs" as get_pipeline() gives them,
        all read together."""
        raise NotImplementedError

    def delete_pipeline(self, pipeline_id, allowed) -> dict | None:
        """Delete the pipeline with its jobs and their results if allowed(record) is
        true of its record (with "jobs") as it is at the moment of deleting. Returns
        that record (deleted or not), or None; `allowed` as for delete()."""
        raise NotImplementedError

    def periodic_last(self, name, now) -> float:
        """The due time of the periodic entry's last firing; the first time an entry
        is asked about, `now` is stored as its last firing and returned."""
        raise NotImplementedError

    def health(self) -> str | None:
        """None if the store can be read and written now, else the cause of its fault
        ("disk is full"), for /status. It may write to find out, but not often."""
        raise NotImplementedError

    def counts(self) -> dict:
        """How many jobs are stored in each status: {status: n} for every one of
        STATUSES. Cheap: it must not read every job (GET /metrics and /status ask
        for it)."""
        raise NotImplementedError

    def close(self):
        """Let the writes under way finish, then release what the store holds.
        Idempotent: close() is the one method that may be called again."""
        raise NotImplementedError


class MemoryStore(Store):
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
        self._keys = {}        # idempotency key -> {"kind", "id", "digest"}
        self._key_of = {}      # job or pipeline id -> its idempotency key

    @staticmethod
    def _out(record):
        job = dict(record)
        job["metadata"] = json.loads(record["metadata"])
        return job

    def _pipeline_out(self, pipeline_id):
        pipeline = dict(self._pipelines[pipeline_id])
        pipeline["jobs"] = [self._out(self._jobs[i]) for i in self._pipeline_jobs[pipeline_id]]
        return pipeline

    def add(self, *jobs, pipeline=None, fired=None, key=None):
        _check_new(jobs)
        records = [dict(job, metadata=json.dumps(job["metadata"])) for job in jobs]
        with self._lock:
            if key is not None and key[0] in self._keys:
                return False
            for job in jobs:
                if job["id"] in self._jobs:
                    raise ValueError(f"a job with the id {job['id']!r} is already stored")
            if pipeline is not None and pipeline["id"] in self._pipelines:
                raise ValueError(f"a pipeline with the id {pipeline['id']!r} is already "
                                 f"stored")
            if fired is not None:
                name, due = fired
                if self._periodic.get(name, -math.inf) >= due:
                    return False
                self._periodic[name] = due
            if pipeline is not None:
                seq = next(self._next_pipeline_seq)
                self._pipelines[pipeline["id"]] = dict(pipeline, seq=seq)
                self._pipeline_seqs.append(seq)
                self._pipeline_ids[seq] = pipeline["id"]
                self._pipeline_jobs[pipeline["id"]] = [job["id"] for job in jobs]
            for record in records:
                seq = record["seq"] = next(self._next_seq)
                self._jobs[record["id"]] = record
                self._ids[seq] = record["id"]
                self._seqs.append(seq)
                self._by_status[record["status"]].append(seq)
            if key is not None:
                kind, item_id = ("job", jobs[0]["id"]) if pipeline is None else (
                    "pipeline", pipeline["id"])
                self._keys[key[0]] = {"kind": kind, "id": item_id, "digest": key[1]}
                self._key_of[item_id] = key[0]
            return True

    def find_key(self, key):
        with self._lock:
            found = self._keys.get(key)
            return None if found is None else dict(found)

    def purge(self, before, statuses=FINISHED, limit=500, pipelines=False):
        _check_finished(statuses)
        with self._lock:
            doomed, whole, seen = [], set(), set()
            for status in statuses:
                for seq in self._by_status[status]:  # oldest first
                    record = self._jobs[self._ids[seq]]
                    if len(doomed) >= limit or (before is not None
                                                and record["created_at"] >= before):
                        break  # (none created after `before` can have finished before)
                    pipeline_id = record["pipeline_id"]
                    if pipeline_id is None:
                        if self._due(record, before):
                            doomed.append(record)
                    elif pipelines and pipeline_id not in seen:
                        seen.add(pipeline_id)
                        jobs = [self._jobs[i] for i in self._pipeline_jobs[pipeline_id]]
                        if all(self._due(job, before) for job in jobs):
                            whole.add(pipeline_id)
                            doomed += jobs
            self._remove_many(doomed)
            for pipeline_id in whole:
                self._remove_pipeline(pipeline_id)
            return len(doomed)

    def _remove_many(self, records):
        """Remove job records, with the lock held. Each sorted list is rebuilt once,
        up to the newest seq removed, rather than shifted once per record."""
        if not records:
            return
        gone = {record["seq"] for record in records}
        newest = max(gone)
        for seqs in (self._seqs, *self._by_status.values()):
            end = bisect.bisect_right(seqs, newest)
            seqs[:end] = [seq for seq in seqs[:end] if seq not in gone]
        for record in records:
            job_id = record["id"]
            del self._jobs[job_id], self._ids[record["seq"]]
            self._results.pop(job_id, None)
            self._keys.pop(self._key_of.pop(job_id, None), None)

    @staticmethod
    def _due(record, before):
        return record["status"] in FINISHED and (before is None or
                                                 record["completed_at"] < before)

    def get(self, job_id):
        with self._lock:
            record = self._jobs.get(job_id)
            return None if record is None else self._out(record)

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE, newest_first=False,
             task_name=None, name=None, created_after=None, created_before=None):
        wanted = [(key, value) for key, value in (("task_name", task_name), ("name", name))
                  if value is not None]
        low = -math.inf if created_after is None else created_after
        high = math.inf if created_before is None else created_before
        with self._lock:
            seqs = self._seqs if status is None else self._by_status.get(status, [])
            if newest_first:
                end = bisect.bisect_left(seqs, after) if after else len(seqs)
                places = range(end - 1, -1, -1)
            else:
                places = range(bisect.bisect_right(seqs, after), len(seqs))
            found = []
            for i in places:  # (a filter that matches few scans far: the price of dicts)
                record = self._jobs[self._ids[seqs[i]]]
                if low < record["created_at"] < high and all(
                        record[key] == value for key, value in wanted):
                    found.append(self._out(record))
                    if len(found) == limit:
                        break
            return found

    def transitions(self, *moves):
        moves = [_checked_move(move) for move in moves]
        stored = [None if not result else (json.dumps(result[0]), result[1])
                  for _, _, _, _, result, _ in moves]
        with self._lock:
            return [self._transition(*move, stored=value)
                    for move, value in zip(moves, stored)]

    def _transition(self, job_id, from_states, to_state, fields, result, then, stored):
        """One move of transitions(), with the lock held; `stored`: its result, as kept."""
        record = self._move(job_id, from_states, to_state, fields)
        if record is None:
            return None
        if stored is not None:
            self._results[job_id] = stored
        elif result == ():
            self._results.pop(job_id, None)
        for move in then:
            self._move(*move)
        return self._out(record)

    def _move(self, job_id, from_states, to_state, fields):
        """Make one move, with the lock held; the record, or None if it does not apply."""
        record = self._jobs.get(job_id)
        if record is None or record["status"] not in from_states:
            return None
        seq, old_seqs = record["seq"], self._by_status[record["status"]]
        del old_seqs[bisect.bisect_left(old_seqs, seq)]
        bisect.insort(self._by_status[to_state], seq)
        record.update(fields or {}, status=to_state)
        return record

    def update(self, item_id, fields, kind="job"):
        _check_fields(fields, _EDITABLE_FIELDS, "update()")
        records = {"job": self._jobs, "pipeline": self._pipelines}[_kind(kind)]
        with self._lock:
            record = records.get(item_id)
            if record is None:
                return False
            record.update(fields)
            return True

    def delete(self, job_id, allowed):
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            job = self._out(record)
            if allowed(job):
                self._remove(record)
            return job

    def _remove(self, record):
        seq, job_id = record["seq"], record["id"]
        if record["pipeline_id"] in self._pipeline_jobs:
            self._pipeline_jobs[record["pipeline_id"]].remove(job_id)
        del self._jobs[job_id], self._ids[seq]
        del self._seqs[bisect.bisect_left(self._seqs, seq)]
        by_status = self._by_status[record["status"]]
        del by_status[bisect.bisect_left(by_status, seq)]
        self._results.pop(job_id, None)
        self._keys.pop(self._key_of.pop(job_id, None), None)

    def result(self, job_id):
        with self._lock:
            stored = self._results.get(job_id)
        if stored is None:
            return None
        return {"value": json.loads(stored[0]), "error": stored[1]}

    def delete_result(self, job_id):
        with self._lock:
            return self._results.pop(job_id, None) is not None

    def get_pipeline(self, pipeline_id):
        with self._lock:
            if pipeline_id not in self._pipelines:
                return None
            return self._pipeline_out(pipeline_id)

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE):
        with self._lock:
            start = bisect.bisect_right(self._pipeline_seqs, after)
            return [self._pipeline_out(self._pipeline_ids[s])
                    for s in self._pipeline_seqs[start:start + limit]]

    def delete_pipeline(self, pipeline_id, allowed):
        with self._lock:
            if pipeline_id not in self._pipelines:
                return None
            pipeline = self._pipeline_out(pipeline_id)
            if allowed(pipeline):
                for job_id in list(self._pipeline_jobs[pipeline_id]):
                    self._remove(self._jobs[job_id])
                self._remove_pipeline(pipeline_id)
            return pipeline

    def _remove_pipeline(self, pipeline_id):
        """Forget a pipeline whose jobs are removed, with the lock held."""
        seq = self._pipelines.pop(pipeline_id)["seq"]
        del self._pipeline_jobs[pipeline_id], self._pipeline_ids[seq]
        del self._pipeline_seqs[bisect.bisect_left(self._pipeline_seqs, seq)]
        self._keys.pop(self._key_of.pop(pipeline_id, None), None)

    def periodic_last(self, name, now):
        with self._lock:
            return self._periodic.setdefault(name, now)

    def health(self):
        return None

    def counts(self):
        with self._lock:
            return {status: len(seqs) for status, seqs in self._by_status.items()}

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
CREATE TABLE IF NOT EXISTS keys (  -- idempotency keys, deleted with what they made
    key     TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,         -- job or pipeline
    item_id TEXT NOT NULL,
    digest  TEXT NOT NULL          -- of the request that made it
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS health (  -- one row, rewritten to prove a write works
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at REAL NOT NULL
);
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
    ("failure_traceback", "TEXT"),
)

_SQL_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task_name, seq);
CREATE INDEX IF NOT EXISTS jobs_by_pipeline ON jobs (pipeline_id, seq)
    WHERE pipeline_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (completed_at)
    WHERE completed_at IS NOT NULL AND pipeline_id IS NULL;
CREATE INDEX IF NOT EXISTS keys_by_item ON keys (item_id);
"""

# How many jobs there are in each status, kept by triggers in the write that changes
# it, so that counting them reads six rows, not every job. Made in one transaction
# with its first counts, on a new file and on one from before valet 0.6.0 alike.
_COUNTS = ("job_counts", "count_added", "count_moved", "count_deleted")
_SQL_COUNTS = (
    *(f"DROP {kind} IF EXISTS {name}" for kind, name in zip(
        ("TABLE", "TRIGGER", "TRIGGER", "TRIGGER"), _COUNTS)),
    "CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO job_counts VALUES " + ", ".join(f"('{s}', 0)" for s in STATUSES),
    "UPDATE job_counts SET n = (SELECT count(*) FROM jobs WHERE jobs.status = "
    "job_counts.status)",
    """CREATE TRIGGER count_added AFTER INSERT ON jobs BEGIN
           UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
       END""",
    """CREATE TRIGGER count_moved AFTER UPDATE OF status ON jobs
           WHEN OLD.status != NEW.status BEGIN
           UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
           UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
       END""",
    """CREATE TRIGGER count_deleted AFTER DELETE ON jobs BEGIN
           UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
       END""",
)

_JOB_COLUMNS = ("seq", "id", "name", "description", "task_name", "metadata", "timeout",
                "status", "failure_reason", "created_at", "started_at", "completed_at",
                *(column for column, _ in _ADDED_COLUMNS))
_JOB_INSERT = (f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS[1:])}) "  # all but seq
               f"VALUES ({', '.join('?' * (len(_JOB_COLUMNS) - 1))})")
_PIPELINE_COLUMNS = ("id", "name", "description", "priority", "run_at", "created_at")
_PIPELINE_INSERT = (f"INSERT INTO pipelines ({', '.join(_PIPELINE_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_PIPELINE_COLUMNS))})")
_SQL_PROBE = "INSERT OR REPLACE INTO health VALUES (1, ?)"  # a write that proves writes work
_MAX_BATCH = 512  # writes applied in one transaction, at most
_IDLE_READERS = 8  # read connections kept open between reads, at most
_VACUUM_STEP = 4096  # pages (16 MB) a purge gives back to the disk, at most
_PROBE_EVERY = 5.0  # seconds: health() writes to check, when no write has for this long

# What a user is told of SQLite's errors (by the prefix of their extended code name).
_CAUSES = {"SQLITE_FULL": "disk is full", "SQLITE_READONLY": "database is read-only",
           "SQLITE_BUSY": "database is locked", "SQLITE_LOCKED": "database is locked",
           "SQLITE_CORRUPT": _CORRUPT, "SQLITE_NOTADB": _CORRUPT,
           "SQLITE_IOERR": "disk I/O error",
           "SQLITE_CANTOPEN": "cannot open the database file",
           "SQLITE_PERM": "no permission to use the database file"}


def _cause(exc):
    """A few words for what went wrong in SQLite: "disk is full"."""
    if isinstance(exc, json.JSONDecodeError) or "Could not decode" in str(exc):
        return _CORRUPT  # a stored row that is not the text or JSON valet wrote
    name = getattr(exc, "sqlite_errorname", None) or ""
    return next((cause for prefix, cause in _CAUSES.items() if name.startswith(prefix)),
                str(exc) or type(exc).__name__)


def _is_fault(exc):
    """Whether an error is the storage's (a full disk, a corrupt file, a stored row
    that is not JSON), not the call's own (a unique key taken, a bad parameter)."""
    return (type(exc) is sqlite3.DatabaseError  # "database disk image is malformed"
            or isinstance(exc, (sqlite3.OperationalError, sqlite3.InternalError,
                                json.JSONDecodeError)))


_LOCK_BYTE = 1 << 20  # Windows locks a byte range: one far past the pid written at 0
_LOCKS = set()  # the lock files this process holds open


def _forget_locks_in_child():
    # A forked child (a task's multiprocessing) shares the parent's open lock file, and
    # the lock lasts while any process holds it open: the child lets go of its copy.
    for lock in list(_LOCKS):
        lock.close()
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _lock_file(path):
    """Open `path` and lock it for as long as it stays open; write our pid in it.
    StoreInUse, naming the owner's pid, if another open file holds the lock (in
    this process or another: the lock is an OS lock, gone when its owner dies)."""
    try:
        lock = open(path, "a+b")
    except OSError as exc:  # a read-only folder, say: valet could not write there either
        raise StorageError("cannot write beside the database",
                           f"{path!r}: {exc.strerror or exc}") from None
    try:
        if os.name == "nt":
            import msvcrt  # on Windows only; both are the standard library's
            lock.seek(_LOCK_BYTE)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.seek(0)
        owner = lock.read(20).decode("ascii", "replace").strip() or "unknown"
        lock.close()
        if exc.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK, errno.EDEADLK):
            raise StorageError("cannot lock the database", f"{path!r}: {exc}") from None
        raise StoreInUse(f"the database {path[:-len('.lock')]!r} is in use by valet pid "
                         f"{owner} (it holds {path!r}); one process at a time may own "
                         f"a SQLite database: stop that one, or give this one another "
                         f"storage.sqlite.path") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    _LOCKS.add(lock)
    return lock


def _unlock_file(lock):
    """Let go of a lock _lock_file() took (Windows would keep it a while after close)."""
    _LOCKS.discard(lock)
    if os.name == "nt":
        import msvcrt
        with contextlib.suppress(OSError):
            lock.seek(_LOCK_BYTE)
            msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)
    lock.close()


@functools.lru_cache(maxsize=64)
def _move_sql(states, columns):
    """The UPDATE of a move from `states` (how many) writing `columns`."""
    sets = "".join(f", {column} = ?" for column in columns)
    marks = ", ".join("?" * states)
    return f"UPDATE jobs SET status = ?{sets} WHERE id = ? AND status IN ({marks})"


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


class _SqlStore(Store):
    """What SqliteStore and PostgresStore share: the SQL of the records (written with
    ? for its parameters), run by each on connections of its own. A subclass gives
    _write(fn, alone), which runs fn(connection) in a transaction (`alone`: fn runs
    one statement, atomic without one) and returns its value once committed;
    _read(sql, args), the rows of a query; _out(row), a job's record from its row;
    _job_row(job) and _job_insert, the values and statement that store a new job;
    and, where they differ, _sql(text) (the statement as its driver takes it), the
    columns of a job's record (_select), and what locks the rows a write reads
    (_lock)."""

    _select = "*"
    _lock = ""

    @staticmethod
    def _sql(text):
        return text

    def add(self, *jobs, pipeline=None, fired=None, key=None):
        _check_new(jobs)
        rows = [self._job_row(job) for job in jobs]
        pipeline_row = None if pipeline is None else [pipeline[c] for c in _PIPELINE_COLUMNS]
        if key is not None:
            key_row = (key[0], *(("job", jobs[0]["id"]) if pipeline is None
                                 else ("pipeline", pipeline["id"])), key[1])

        def insert(conn):
            if fired is not None and conn.execute(self._sql(
                    "INSERT INTO periodic VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "last_due = excluded.last_due WHERE periodic.last_due < excluded.last_due"),
                    fired).rowcount == 0:
                return False
            if key is not None and conn.execute(self._sql(
                    "INSERT INTO keys VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                    key_row).rowcount == 0:
                return False
            if pipeline_row is not None:
                conn.execute(self._sql(_PIPELINE_INSERT), pipeline_row)
            for row in rows:
                conn.execute(self._job_insert, row)
            return True

        alone = len(rows) == 1 and pipeline is None and fired is None and key is None
        return self._write(insert, alone=alone)

    def get(self, job_id):
        rows = self._read(f"SELECT {self._select} FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE, newest_first=False,
             task_name=None, name=None, created_after=None, created_before=None):
        if any("\0" in value for value in (task_name, name) if isinstance(value, str)):
            return []  # (no stored text holds NUL: PostgreSQL's cannot)
        clauses, args = [], []
        for clause, value in (("status = ?", status), ("task_name = ?", task_name),
                              ("name = ?", name), ("created_at > ?", created_after),
                              ("created_at < ?", created_before),
                              ("seq < ?" if newest_first else "seq > ?",
                               after if after or not newest_first else None)):
            if value is not None:
                clauses.append(clause)
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        return self._read(f"SELECT {self._select} FROM jobs {where}ORDER BY seq "
                          f"{'DESC ' if newest_first else ''}LIMIT ?", [*args, limit])

    def update(self, item_id, fields, kind="job"):
        _check_fields(fields, _EDITABLE_FIELDS, "update()")
        table = {"job": "jobs", "pipeline": "pipelines"}[_kind(kind)]
        sets = ", ".join(f"{column} = ?" for column in fields) or "id = id"
        sql = self._sql(f"UPDATE {table} SET {sets} WHERE id = ?")
        args = [*fields.values(), item_id]
        return self._write(lambda conn: conn.execute(sql, args).rowcount == 1, alone=True)

    def delete(self, job_id, allowed):
        def remove(conn):
            job = self._out(conn.execute(self._sql(
                f"SELECT {self._select} FROM jobs WHERE id = ?{self._lock}"),
                (job_id,)).fetchone())
            if job is not None and allowed(job):
                for table, column in (("jobs", "id"), ("results", "job_id"),
                                      ("keys", "item_id")):
                    conn.execute(self._sql(f"DELETE FROM {table} WHERE {column} = ?"),
                                 (job_id,))
            return job

        return self._write(remove)

    def result(self, job_id):
        rows = self._read("SELECT value, error FROM results WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        return {"value": json.loads(rows[0]["value"]), "error": rows[0]["error"]}

    def delete_result(self, job_id):
        sql = self._sql("DELETE FROM results WHERE job_id = ?")
        return self._write(lambda conn: conn.execute(sql, (job_id,)).rowcount == 1,
                           alone=True)

    def _pipeline(self, conn, pipeline_id, lock=""):
        """The pipeline's record with its jobs, read on `conn` (with `lock`, the rows
        locked for a write), or None."""
        pipeline = conn.execute(self._sql(f"SELECT * FROM pipelines WHERE id = ?{lock}"),
                                (pipeline_id,)).fetchone()
        if pipeline is None:
            return None
        pipeline["jobs"] = [self._out(row) for row in conn.execute(self._sql(
            f"SELECT {self._select} FROM jobs WHERE pipeline_id = ? ORDER BY seq{lock}"),
            (pipeline_id,))]
        return pipeline

    def delete_pipeline(self, pipeline_id, allowed):
        def remove(conn):
            pipeline = self._pipeline(conn, pipeline_id, lock=self._lock)
            if pipeline is not None and allowed(pipeline):
                for sql in ("DELETE FROM results WHERE job_id IN (SELECT id FROM jobs "
                            "WHERE pipeline_id = ?)", "DELETE FROM jobs WHERE pipeline_id = ?",
                            "DELETE FROM pipelines WHERE id = ?",
                            "DELETE FROM keys WHERE item_id = ?"):
                    conn.execute(self._sql(sql), (pipeline_id,))
            return pipeline

        return self._write(remove)

    def find_key(self, key):
        rows = self._read("SELECT kind, item_id AS id, digest FROM keys WHERE key = ?",
                          (key,))
        return rows[0] if rows else None

    def periodic_last(self, name, now):
        def anchor(conn):
            conn.execute(self._sql("INSERT INTO periodic VALUES (?, ?) ON CONFLICT DO "
                                   "NOTHING"), (name, now))
            return conn.execute(self._sql("SELECT last_due FROM periodic WHERE name = ?"),
                                (name,)).fetchone()["last_due"]

        return self._write(anchor)


class SqliteStore(_SqlStore):
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

    One store owns the file: opening it takes an OS lock on `path`.lock, held
    until close() or the process ends; a second store, in any process, gets
    StoreInUse. Opening checks the file (quick_check): StorageError if it is
    corrupt. While SQLite fails (a full disk, a read-only file), every call
    raises StorageError; the fault is logged once, when it begins, and once more
    when a write succeeds again. New files give freed pages back to the disk.
    """

    option = "sqlite"
    _job_insert = _JOB_INSERT

    def __init__(self, path, synchronous="full"):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):  # else sqlite3 says only "unable to open"
            raise StorageError("cannot open the database file", f"its folder {folder!r} "
                               f"does not exist")
        self._synchronous = synchronous.upper()
        self._fault = None       # the cause of the current fault, or None
        self._fault_lock = threading.Lock()  # guards _fault
        self._last_write = time.monotonic()  # when a write last committed
        # (The real path: a database reached through a symbolic link has one lock.)
        self._owner = _lock_file(os.path.realpath(self.path) + ".lock")
        try:
            self._conn = self._connect()
            self._prepare()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._conn.close()
            _unlock_file(self._owner)
            if isinstance(exc, sqlite3.Error):
                raise StorageError(_cause(exc), str(exc)) from None
            raise
        self._readers = queue.SimpleQueue()  # idle read connections
        self._queue_lock = threading.Lock()  # guards the three attributes below
        self._queued = []       # _Writes waiting for a commit, oldest first
        self._leading = False   # a caller is committing (and will pass the lead on)
        self._closed = False
        self._idle = threading.Condition(self._queue_lock)  # notified when none leads
        self.commits = 0  # transactions committed (counted by the leader of each)

    def _prepare(self):
        """Check the file and bring its tables up to date; StorageError if it cannot."""
        conn = self._conn
        try:
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()
            problem = next(iter(problem.values()))
            if problem != "ok":
                raise StorageError(_CORRUPT, " ".join(problem.split()))  # one line
            if not conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall():
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # a new file: give back
            conn.execute("PRAGMA journal_mode = WAL")              # freed pages
            conn.execute("PRAGMA journal_size_limit = 16777216")  # WAL kept below 16 MB
            conn.executescript(_SQL_TABLES)
            self._add_columns()
            conn.executescript(_SQL_INDEXES)
            self._add_counts()
            self._vacuums = conn.execute("PRAGMA auto_vacuum").fetchone()[
                "auto_vacuum"] == 2  # INCREMENTAL
            # A write, so that a file valet cannot write (read-only) stops it at start.
            conn.execute(_SQL_PROBE, (time.time(),))
        except sqlite3.Error as exc:
            raise StorageError(_cause(exc), str(exc)) from None

    # -- faults

    def _failed(self, exc):
        """Note a fault of the storage, logging it if it is a new one; return the
        StorageError to raise."""
        cause = _cause(exc)
        with self._fault_lock:
            new, self._fault = self._fault != cause, cause
            self.errors += 1
        if new:
            log.error("storage: %s (%s: %s); requests that need it get 503 until it "
                      "clears", cause, type(exc).__name__, exc)
        return StorageError(cause, str(exc))

    def _wrote(self):
        """A write committed: a fault, if there was one, is over (but corruption,
        which does not mend itself: a write may succeed beside a corrupt page)."""
        self._last_write = time.monotonic()
        if self._fault is not None and self._fault != _CORRUPT:
            with self._fault_lock:
                cause, self._fault = self._fault, None
            if cause is not None:
                log.warning("storage: working again (it had failed: %s)", cause)

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

    def _add_counts(self):
        """Make the job counts table and its triggers, counted afresh, unless this
        file has all four (a file without them, or with only some, is made whole)."""
        def made():
            return self._conn.execute(
                f"SELECT count(*) AS n FROM sqlite_schema WHERE name IN "
                f"({', '.join('?' * len(_COUNTS))})", _COUNTS).fetchone()["n"] == len(_COUNTS)

        if made():
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if not made():  # again: another process may have just made it
                for statement in _SQL_COUNTS:
                    self._conn.execute(statement)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # -- writing

    def _write(self, fn, alone=False):
        """Run fn(connection) in a transaction; block until it has committed. (Alone or
        not: writes that arrive together share a transaction anyway.)"""
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
                    self._rollback()
                    if not _is_fault(exc):
                        log.exception("sqlite: a write transaction failed")
                    outcomes = [(None, exc)] * len(writes)
            for write, (value, error) in zip(writes, outcomes):
                write.value, write.error = value, error
                if _is_fault(error):
                    write.error = self._failed(error)
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
                if not conn.in_transaction:  # SQLite gave up on all of it (a full disk):
                    raise                    # that error, not a savepoint's, is the cause
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                outcomes.append((None, exc))
        conn.execute("COMMIT")
        self.commits += 1
        self._wrote()
        return outcomes

    def _rollback(self):
        with contextlib.suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    # -- reading

    @contextlib.contextmanager
    def _reading(self):
        if self._closed:
            raise RuntimeError("the store is closed")
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
        broken = False
        try:
            yield conn
        except (sqlite3.Error, json.JSONDecodeError) as exc:  # (a row that is not JSON)
            broken = True  # the connection may be in a bad state: open another next time
            if _is_fault(exc):
                raise self._failed(exc) from None
            raise
        finally:
            if broken or self._readers.qsize() >= _IDLE_READERS:
                conn.close()  # (or a burst of readers is over)
            else:
                self._readers.put(conn)

    @contextlib.contextmanager
    def _snapshot(self):
        """A read connection in a transaction: its reads see one moment of the file."""
        with self._reading() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @staticmethod
    def _out(row):
        if row is not None and "metadata" in row:
            row["metadata"] = json.loads(row["metadata"])
            row["use_previous_results"] = bool(row["use_previous_results"])
        return row

    def _read(self, sql, args=()):
        with self._reading() as conn:
            return [self._out(row) for row in conn.execute(sql, args).fetchall()]

    def _with_jobs(self, conn, pipelines):
        """Give each pipeline record its "jobs", read on `conn` by one query."""
        by_id = {pipeline["id"]: pipeline for pipeline in pipelines}
        for pipeline in pipelines:
            pipeline["jobs"] = []
        if pipelines:  # the page is every pipeline from its first seq to its last
            rows = conn.execute(
                "SELECT * FROM jobs WHERE pipeline_id IN (SELECT id FROM pipelines WHERE "
                "seq BETWEEN ? AND ?) ORDER BY seq",
                (pipelines[0]["seq"], pipelines[-1]["seq"]))
            for row in rows:
                by_id[row["pipeline_id"]]["jobs"].append(self._out(row))
        return pipelines

    # -- the interface

    @staticmethod
    def _job_row(job):
        return [json.dumps(job[c]) if c == "metadata" else job[c] for c in _JOB_COLUMNS[1:]]

    def transitions(self, *moves):
        steps = [self._transition(*_checked_move(move)) for move in moves]
        return [self._out(record) for record in self._write(
            lambda conn: [step(conn) for step in steps])]

    @staticmethod
    def _transition(job_id, from_states, to_state, fields, result, then):
        """One move of transitions(), its SQL made: the function that writes it."""
        moves = []
        for move_id, states, state, move_fields in ((job_id, from_states, to_state, fields),
                                                    *then):
            move_fields = move_fields or {}
            moves.append((_move_sql(len(states), tuple(move_fields)),
                          [state, *move_fields.values(), move_id, *states]))
        value_json = None if not result else json.dumps(result[0])

        def move(conn):
            (sql, args), *more = moves
            if conn.execute(sql, args).rowcount == 0:
                return None
            if result:
                conn.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                             (job_id, value_json, result[1]))
            elif result == ():
                conn.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
            for then_sql, then_args in more:
                conn.execute(then_sql, then_args)
            return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

        return move

    def get_pipeline(self, pipeline_id):
        with self._snapshot() as conn:
            return self._pipeline(conn, pipeline_id)

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE):
        with self._snapshot() as conn:
            pipelines = conn.execute("SELECT * FROM pipelines WHERE seq > ? ORDER BY seq "
                                     "LIMIT ?", (after, limit)).fetchall()
            return self._with_jobs(conn, pipelines)

    def purge(self, before, statuses=FINISHED, limit=500, pipelines=False):
        _check_finished(statuses)
        marks = ", ".join("?" * len(statuses))
        before_sql, before_args = ("completed_at < ?", [before]) if before is not None else (
            "completed_at IS NOT NULL", [])

        def remove(conn):
            ids = [row["id"] for row in conn.execute(
                f"SELECT id FROM jobs WHERE {before_sql} AND pipeline_id IS NULL AND "
                f"status IN ({marks}) ORDER BY completed_at LIMIT ?",
                [*before_args, *statuses, limit])]
            whole = []
            if pipelines and len(ids) < limit:
                whole = [row["id"] for row in conn.execute(
                    "SELECT id FROM pipelines AS p WHERE created_at < ? AND NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE pipeline_id = p.id AND (completed_at IS "
                    "NULL OR completed_at >= ?)) ORDER BY seq LIMIT ?",
                    (before, before, max(1, (limit - len(ids)) // _MAX_PIPELINE_JOBS)))]
            for table, column, items in (("results", "job_id", ids), ("keys", "item_id", ids),
                                         ("jobs", "id", ids), ("keys", "item_id", whole)):
                for i in range(0, len(items), 500):
                    chunk = items[i:i + 500]
                    conn.execute(f"DELETE FROM {table} WHERE {column} IN "
                                 f"({', '.join('?' * len(chunk))})", chunk)
            deleted = len(ids)
            for pipeline_id in whole:
                conn.execute("DELETE FROM results WHERE job_id IN (SELECT id FROM jobs "
                             "WHERE pipeline_id = ?)", (pipeline_id,))
                deleted += conn.execute("DELETE FROM jobs WHERE pipeline_id = ?",
                                        (pipeline_id,)).rowcount
                conn.execute("DELETE FROM pipelines WHERE id = ?", (pipeline_id,))
            # Give the freed pages back to the disk. Each step of incremental_vacuum
            # frees one page, and Python steps a statement without columns only once.
            # (A file made before 0.5.0 keeps its freed pages for reuse: no vacuum.)
            # At most _VACUUM_STEP pages a time, so the write stays short; the rest
            # goes at the next purge.
            for _ in range(_VACUUM_STEP if deleted and self._vacuums else 0):
                if not conn.execute("PRAGMA freelist_count").fetchone()["freelist_count"]:
                    break
                conn.execute("PRAGMA incremental_vacuum")
            return deleted

        return self._write(remove)

    def health(self):
        """The fault, if one is known; else, if no write has committed for a while, a
        small write that would fail as the others would (a full disk, a read-only
        file), so that /status tells the truth on an idle server too."""
        since = time.monotonic() - self._last_write
        if since < (1 if self._fault is not None else _PROBE_EVERY):
            return self._fault
        try:
            self._write(lambda conn: conn.execute(_SQL_PROBE, (time.time(),)))
        except StorageError as exc:
            self._last_write = time.monotonic()  # probe again in a second, not at once
            return exc.cause
        except RuntimeError:
            return "the store is closed"
        return self._fault  # None, unless the file is corrupt

    def counts(self):
        found = {row["status"]: row["n"] for row in self._read(
            "SELECT status, n FROM job_counts")}
        return {status: found.get(status, 0) for status in STATUSES}

    def close(self):
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
        _unlock_file(self._owner)  # another store may open the file now


# PostgreSQL: several valet processes, "nodes", on one database. Its tables live in
# a schema of their own (storage.postgres.schema), made and upgraded by the steps
# below, each once, in order, under an advisory lock: nodes that start together
# take turns, and the first does the work.
_PG_STEPS = (
    # 1: the tables of 0.8.0
    """
    CREATE TABLE jobs (
        seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id             TEXT NOT NULL UNIQUE,
        name           TEXT NOT NULL,
        description    TEXT,
        task_name      TEXT NOT NULL,
        metadata       TEXT NOT NULL,   -- JSON, as given (jsonb would reorder keys)
        timeout        TEXT,            -- JSON: an int stays an int, a float a float
        status         TEXT NOT NULL,
        failure_reason TEXT,
        created_at     DOUBLE PRECISION NOT NULL,  -- epoch seconds
        started_at     DOUBLE PRECISION,
        completed_at   DOUBLE PRECISION,
        priority       INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        max_retries    INTEGER NOT NULL,
        retry_backoff  TEXT NOT NULL,   -- JSON, as timeout
        run_at         DOUBLE PRECISION,
        pipeline_id    TEXT,
        previous_job_id TEXT,
        next_job_id    TEXT,
        use_previous_results BOOLEAN NOT NULL,
        failure_traceback TEXT,
        node           TEXT,            -- the node that runs it (or ran it last)
        ready_at       DOUBLE PRECISION, -- when it last became ready to run (its turn in
                                         -- a pipeline: null until then)
        taken_from     TEXT             -- the dead node its node took it over from
    );
    CREATE INDEX jobs_ready ON jobs (priority DESC, ready_at, seq)
        WHERE status = 'PENDING' AND ready_at IS NOT NULL;
    CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'SCHEDULED';
    CREATE INDEX jobs_running ON jobs (node) WHERE status = 'IN_PROGRESS';
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE INDEX jobs_by_task ON jobs (task_name, seq);
    CREATE INDEX jobs_by_pipeline ON jobs (pipeline_id, seq) WHERE pipeline_id IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs (completed_at)
        WHERE completed_at IS NOT NULL AND pipeline_id IS NULL;
    CREATE TABLE results (
        job_id TEXT PRIMARY KEY,
        value  TEXT NOT NULL,           -- JSON
        error  TEXT
    );
    CREATE TABLE pipelines (
        seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        name        TEXT NOT NULL,
        description TEXT,
        priority    INTEGER NOT NULL,
        run_at      DOUBLE PRECISION,
        created_at  DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE periodic (
        name     TEXT PRIMARY KEY,
        last_due DOUBLE PRECISION NOT NULL  -- the due time of its last firing
    );
    CREATE TABLE keys (
        key     TEXT PRIMARY KEY,
        kind    TEXT NOT NULL,
        item_id TEXT NOT NULL,
        digest  TEXT NOT NULL
    );
    CREATE INDEX keys_by_item ON keys (item_id);
    CREATE TABLE nodes (
        name         TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        version      TEXT NOT NULL,
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL  -- the database's clock, not the node's
    );
    -- How many jobs there are in each status: every change of a job's status adds
    -- rows of +1 and -1 (no row is updated, so nodes never wait on each other for
    -- it), and counts() folds them into one row per status now and then.
    CREATE TABLE job_counts (status TEXT NOT NULL, n BIGINT NOT NULL);
    CREATE FUNCTION count_jobs() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$  -- (its schema's tables, whoever deletes)
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.status = NEW.status THEN
            RETURN NULL;
        END IF;
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            INSERT INTO job_counts VALUES (OLD.status, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO job_counts VALUES (NEW.status, 1);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER count_jobs AFTER INSERT OR DELETE OR UPDATE OF status ON jobs
        FOR EACH ROW EXECUTE FUNCTION count_jobs();
    -- What every node hears (NOTIFY, sent when the change commits): "work" when a
    -- job may have become ready, and "job <id> <attempts> <status> <node>" when a job
    -- has moved (but to IN_PROGRESS), or "job <id> - DELETED -".
    CREATE FUNCTION notify_nodes() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        channel TEXT := 'valet.' || TG_TABLE_SCHEMA;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify(channel, 'job ' || OLD.id || ' - DELETED -');
            RETURN NULL;
        END IF;
        IF TG_OP = 'UPDATE' AND OLD.status = NEW.status THEN
            RETURN NULL;
        END IF;
        IF NEW.status IN ('PENDING', 'SCHEDULED') OR (NEW.status = 'COMPLETED'
                AND NEW.next_job_id IS NOT NULL) THEN
            PERFORM pg_notify(channel, 'work');
        END IF;
        IF TG_OP = 'UPDATE' AND NEW.status <> 'IN_PROGRESS' THEN
            PERFORM pg_notify(channel, 'job ' || NEW.id || ' ' || NEW.attempts || ' ' ||
                                       NEW.status || ' ' || coalesce(NEW.node, '-'));
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER notify_nodes AFTER INSERT OR DELETE OR UPDATE OF status ON jobs
        FOR EACH ROW EXECUTE FUNCTION notify_nodes();
    """,
)

_PG_JOB = ", ".join(_JOB_COLUMNS)  # a job's record, without the node running it
_PG_JOB_INSERT = (f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS[1:])}, node, ready_at) "
                  f"VALUES ({', '.join(['%s'] * (len(_JOB_COLUMNS) + 1))})")
_PG_PIPELINE_INSERT = (f"INSERT INTO pipelines ({', '.join(_PIPELINE_COLUMNS)}) "
                       f"VALUES ({', '.join(['%s'] * len(_PIPELINE_COLUMNS))})")
# A PENDING job whose turn it is: not one of a pipeline waiting for the job before it
# (whose ready_at is null until that job has COMPLETED).
_PG_TURN = "status = 'PENDING' AND ready_at IS NOT NULL"
_PG_COUNT_ROWS = 5000  # rows of job_counts past which counts() folds them
# How long a node waits for a database that does not answer before it says so (503),
# rather than for as long as TCP would: connecting, and a connection gone silent.
_PG_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30000}
_PG_WAIT = 30  # seconds a call waits for one of the node's connections to be free
_PG_ROLLBACKS = 5      # tries of a transaction that PostgreSQL rolled back (a deadlock)


def _one_line(exc):
    """An error's message on one line (PostgreSQL's take several)."""
    return " ".join(str(exc).split())


def _pg_name(name):
    """A name quoted for SQL (a schema, a channel)."""
    return '"' + name.replace('"', '""') + '"'


class PostgresStore(_SqlStore):
    """Jobs in a PostgreSQL database, shared by several valet processes (nodes).

    Each call takes a connection from a pool of this store's own and runs in one
    transaction; every write has committed when it returns. PostgreSQL's row locks
    make each transition safe between nodes: two nodes that move one job from the
    same status cannot both succeed. A transition that ends a running attempt
    (from IN_PROGRESS alone) applies only to a job this node runs, and only to the
    attempt it names (the attempts it writes), so a node that was taken for dead
    cannot end a job another node has taken over since, nor a later attempt.

    Beyond the interface, the methods a node uses to share the work (shared =
    True): join() and leave() the nodes table, claim() ready jobs, beat() the
    heartbeat and take over the jobs of dead nodes, and listen() for what the
    other nodes did. Every change of a job is told to every node by a trigger
    (notify_nodes) with NOTIFY on the schema's channel, when the change commits:
    "work" when a job may have become ready, and "job <id> <attempts> <status>
    <node>" when a job has moved (but to IN_PROGRESS) or was deleted.

    Needs psycopg 3 (pip install "psycopg[binary]"), imported here and nowhere else.
    """

    option = "postgres"
    shared = True
    _job_insert = _PG_JOB_INSERT
    _select = _PG_JOB
    _lock = " FOR UPDATE"  # (SQLite's writes take turns: they need no lock of a row)

    def __init__(self, dsn, schema="valet", node=None, connections=10):
        try:
            import psycopg
            import psycopg.rows
        except ImportError:
            raise ConfigError(f'storage.option: postgres needs the psycopg driver, which '
                              f'this Python ({sys.executable}) does not have: pip install '
                              f'"psycopg[binary]" (here: {sys.executable} -m pip install '
                              f'"psycopg[binary]")') from None
        self._pg = psycopg
        from psycopg.types.string import StrDumperUnknown

        class Text(StrDumperUnknown):
            """PostgreSQL's text cannot hold NUL: U+FFFD is written in its place (in a
            task's failure reason, say; an id with one, looked for, is found nowhere)."""
            def dump(self, obj):
                return super().dump(obj.replace("\0", "\ufffd") if "\0" in obj else obj)

        self._text = Text
        self.dsn = dsn
        self.schema = schema
        self.channel = f"valet.{schema}"  # NOTIFY's channel: one per schema
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"  # join() names it
        self._idle = queue.SimpleQueue()  # connections not in use
        self._free = threading.BoundedSemaphore(connections)  # connections to open or use
        self._fault = None
        self._fault_lock = threading.Lock()
        self._closed = False
        self._listener = None  # the connection listen() holds
        self._checked = 0.0    # when health() last reached the database (monotonic)
        self.where = self._where(dsn)
        from psycopg.conninfo import conninfo_to_dict
        self._given = {key: value for key, value in conninfo_to_dict(dsn).items()
                       if key in _PG_TIMEOUTS}  # (the DSN's own settings win, and
        if "PGCONNECT_TIMEOUT" in os.environ:  # libpq's variable)
            self._given["connect_timeout"] = os.environ["PGCONNECT_TIMEOUT"]
        conn = None
        try:  # (a fault here stops valet with one line: it is not logged as one)
            conn = self._connect(opening=True)
            self._migrate(conn)
        except (psycopg.Error, StorageError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StorageError):  # (a schema newer than this valet)
                raise
            raise StorageError(self._cause(exc), _one_line(exc)) from None
        self._idle.put(conn)

    @staticmethod
    def _where(dsn):
        """The database a DSN names, without its password: for the log."""
        try:
            from psycopg.conninfo import conninfo_to_dict
            parts = conninfo_to_dict(dsn)
        except Exception:
            return "postgres"
        host = parts.get("host") or "localhost"
        name = parts.get("dbname") or parts.get("user") or ""
        return f"{name}@{host}:{parts.get('port') or 5432}"

    # -- connections

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _sql(text):
        return text.replace("?", "%s")

    def _write(self, fn, alone=False):
        return self._run(fn, transaction=not alone)

    def _connect(self, opening=False):
        try:
            conn = self._pg.connect(self.dsn, autocommit=True,
                                    row_factory=self._pg.rows.dict_row,
                                    **{**_PG_TIMEOUTS, **self._given},
                                    application_name=f"valet {self.node}"[:63])
            conn.adapters.register_dumper(str, self._text)
            conn.execute(f"SET search_path TO {_pg_name(self.schema)}")
            return conn
        except self._pg.Error as exc:
            if opening:
                raise
            raise self._failed(exc) from None

    def _cause(self, exc):
        """A few words for what went wrong: "cannot reach PostgreSQL"."""
        pg = self._pg
        if isinstance(exc, pg.OperationalError) and getattr(exc, "sqlstate", None) in (
                None, "57P01", "57P02", "57P03", "08000", "08003", "08006", "08001"):
            return "cannot reach PostgreSQL"
        if isinstance(exc, pg.errors.DiskFull):
            return "disk is full"
        if isinstance(exc, pg.errors.ReadOnlySqlTransaction):
            return "database is read-only"
        if isinstance(exc, json.JSONDecodeError):
            return _CORRUPT
        return _one_line(exc).split(": ")[0] or type(exc).__name__

    def _is_fault(self, exc):
        """Whether an error is the database's (unreachable, full, read-only), not the
        call's own (a unique key taken)."""
        pg = self._pg
        return isinstance(exc, (pg.OperationalError, pg.InterfaceError, pg.InternalError,
                                json.JSONDecodeError))

    def _failed(self, exc):
        """Note a fault, logging it if it is a new one; the StorageError to raise."""
        cause = self._cause(exc)
        with self._fault_lock:
            new, self._fault = self._fault != cause, cause
            self.errors += 1
        if new:
            log.error("storage: %s (%s: %s); requests that need it get 503 until it "
                      "clears", cause, type(exc).__name__, _one_line(exc))
        return StorageError(cause, _one_line(exc))

    def _worked(self):
        self._checked = time.monotonic()
        if self._fault is not None:
            with self._fault_lock:
                cause, self._fault = self._fault, None
            if cause is not None:
                log.warning("storage: working again (it had failed: %s)", cause)

    def _run(self, fn, snapshot=False, transaction=True):
        """fn(connection) in one transaction (with snapshot, a read-only one that sees
        one moment of the database), on a connection of the pool; its value once
        committed. A transaction PostgreSQL rolls back to break a deadlock is tried
        again; a fault of the database raises StorageError."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if not self._free.acquire(timeout=_PG_WAIT):
            raise self._failed(TimeoutError(
                f"every connection of storage.postgres.connections is in use, for "
                f"{_PG_WAIT}s: the database answers slowly, or they are too few"))
        try:
            return self._try(fn, snapshot, transaction)
        finally:
            self._free.release()

    def _try(self, fn, snapshot, transaction):
        for attempt in range(_PG_ROLLBACKS):
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                with conn.transaction() if transaction else contextlib.nullcontext():
                    if snapshot:
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ "
                                     "READ ONLY")
                    value = fn(conn)
            except BaseException as exc:
                if isinstance(exc, self._pg.errors.TransactionRollback) and (
                        attempt + 1 < _PG_ROLLBACKS):  # (a deadlock, broken: try again)
                    self._idle.put(conn)
                    continue
                if conn.broken or conn.closed or not isinstance(exc, self._pg.Error):
                    conn.close()  # (a KeyboardInterrupt may leave it mid-statement)
                    if conn.broken:  # the server went away: so did the idle ones
                        self._close_idle()
                else:
                    self._idle.put(conn)
                if isinstance(exc, Exception) and self._is_fault(exc):
                    raise self._failed(exc) from None
                raise
            self._idle.put(conn)
            self._worked()
            return value

    def _migrate(self, conn):
        """Make or upgrade the tables: the steps not yet taken, in one transaction,
        while holding the schema's advisory lock."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                         (f"valet migration {self.schema}",))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_pg_name(self.schema)}")
            conn.execute("CREATE TABLE IF NOT EXISTS version (step INTEGER NOT NULL)")
            row = conn.execute("SELECT max(step) AS step FROM version").fetchone()
            done = row["step"] or 0
            if done > len(_PG_STEPS):
                raise StorageError("the database was upgraded by a newer valet",
                                   f"schema {self.schema!r} is at step {done}; this valet "
                                   f"{__version__} knows {len(_PG_STEPS)}: run the newer one")
            for step in range(done, len(_PG_STEPS)):
                conn.execute(_PG_STEPS[step])
                conn.execute("INSERT INTO version VALUES (%s)", (step + 1,))
            if done < len(_PG_STEPS):
                log.info("storage: %s valet's tables in the schema %r of %s (schema step "
                         "%d)", "made" if done == 0 else f"upgraded from step {done}",
                         self.schema, self.where, len(_PG_STEPS))

    # -- records

    @staticmethod
    def _out(row):
        if row is not None and "metadata" in row:
            row["metadata"] = json.loads(row["metadata"])
            row["timeout"] = None if row["timeout"] is None else json.loads(row["timeout"])
            row["retry_backoff"] = json.loads(row["retry_backoff"])
        return row

    def _job_row(self, job):
        row = [json.dumps(job[c]) if c in ("metadata", "retry_backoff") or (
            c == "timeout" and job[c] is not None) else job[c] for c in _JOB_COLUMNS[1:]]
        return [*row, self.node if job["status"] == IN_PROGRESS else None,
                None if job["previous_job_id"] else max(job["created_at"], job["run_at"] or 0)]

    def _read(self, sql, args=()):
        return self._run(lambda conn: [self._out(row) for row in
                                       conn.execute(self._sql(sql), args).fetchall()])

    @staticmethod
    def _moved(job):
        """The notice of a job's move (as notify_nodes() words it), found by looking."""
        return f"job {job['id']} {job['attempts']} {job['status']} {job.get('node') or '-'}"

    # -- the interface

    def transitions(self, *moves):
        moves = [_checked_move(move) for move in moves]
        # A move is one statement; one move alone needs no transaction around it (a
        # round trip each for BEGIN and COMMIT) to be atomic.
        alone = len(moves) == 1 and not moves[0][5]
        return self._run(lambda conn: self._transitions(conn, moves), transaction=not alone)

    def _transitions(self, conn, moves):
        records = []
        for job_id, from_states, to_state, fields, result, then in moves:
            record = self._out(self._move(conn, job_id, from_states, to_state, fields,
                                          result))
            records.append(record)
            for move_id, states, state, move_fields in then if record is not None else ():
                self._move(conn, move_id, states, state, move_fields)
        return records

    def _move(self, conn, job_id, from_states, to_state, fields, result=None):
        """One statement: the UPDATE of a move, and with it its result stored (or, with
        result=(), deleted) and, for a job COMPLETED, the next of its pipeline made
        ready. The moved row, or None."""
        fields = dict(fields or {})
        if to_state == IN_PROGRESS:
            fields["node"] = self.node
        elif to_state == PENDING:  # (a job retried by request: ready from now on)
            fields["ready_at"] = time.time()
        sets = "".join(f", {column} = %s" for column in fields)
        mine, theirs = "", []  # (the end of an attempt: only this node's, that attempt)
        if tuple(from_states) == (IN_PROGRESS,):
            mine, theirs = " AND node = %s", [self.node]
            if "attempts" in fields:
                mine, theirs = mine + " AND attempts = %s", theirs + [fields["attempts"]]
        sql = (f"WITH moved AS (UPDATE jobs SET status = %s{sets} WHERE id = %s AND "
               f"status = ANY(%s){mine} RETURNING {_PG_JOB})")
        args = [to_state, *fields.values(), job_id, list(from_states), *theirs]
        if to_state == COMPLETED:  # the next job's turn, if it is in a pipeline
            sql += (", ready AS (UPDATE jobs AS j SET ready_at = moved.completed_at FROM "
                    "moved WHERE j.id = moved.next_job_id)")
        if result:
            sql += (", kept AS (INSERT INTO results SELECT id, %s, %s FROM moved ON "
                    "CONFLICT (job_id) DO UPDATE SET value = excluded.value, error = "
                    "excluded.error)")
            args += [json.dumps(result[0]), result[1]]
        elif result == ():
            sql += ", gone AS (DELETE FROM results USING moved WHERE job_id = moved.id)"
        return conn.execute(sql + " SELECT * FROM moved", args).fetchone()

    def get_pipeline(self, pipeline_id):
        return self._run(lambda conn: self._pipeline(conn, pipeline_id), snapshot=True)

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE):
        def read(conn):
            pipelines = conn.execute("SELECT * FROM pipelines WHERE seq > %s ORDER BY seq "
                                     "LIMIT %s", (after, limit)).fetchall()
            by_id = {pipeline["id"]: pipeline for pipeline in pipelines}
            for pipeline in pipelines:
                pipeline["jobs"] = []
            if pipelines:
                for row in conn.execute(
                        f"SELECT {_PG_JOB} FROM jobs WHERE pipeline_id = ANY(%s) ORDER BY seq",
                        (list(by_id),)):
                    by_id[row["pipeline_id"]]["jobs"].append(self._out(row))
            return pipelines

        return self._run(read, snapshot=True)

    def purge(self, before, statuses=FINISHED, limit=500, pipelines=False):
        _check_finished(statuses)
        before_sql, before_args = ("completed_at < %s", [before]) if before is not None else (
            "completed_at IS NOT NULL", [])

        def remove(conn):
            ids = [row["id"] for row in conn.execute(
                f"SELECT id FROM jobs WHERE {before_sql} AND pipeline_id IS NULL AND "
                f"status = ANY(%s) ORDER BY completed_at LIMIT %s FOR UPDATE SKIP LOCKED",
                [*before_args, list(statuses), limit])]
            whole = []
            if pipelines and len(ids) < limit:
                whole = [row["id"] for row in conn.execute(
                    "SELECT id FROM pipelines AS p WHERE created_at < %s AND NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE pipeline_id = p.id AND (completed_at IS "
                    "NULL OR completed_at >= %s)) ORDER BY seq LIMIT %s "
                    "FOR UPDATE SKIP LOCKED",
                    (before, before, max(1, (limit - len(ids)) // _MAX_PIPELINE_JOBS)))]
            conn.execute("DELETE FROM results WHERE job_id = ANY(%s)", (ids,))
            conn.execute("DELETE FROM keys WHERE item_id = ANY(%s)", (ids + whole,))
            deleted = conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (ids,)).rowcount
            if whole:
                conn.execute("DELETE FROM results WHERE job_id IN (SELECT id FROM jobs "
                             "WHERE pipeline_id = ANY(%s))", (whole,))
                deleted += conn.execute("DELETE FROM jobs WHERE pipeline_id = ANY(%s)",
                                        (whole,)).rowcount
                conn.execute("DELETE FROM pipelines WHERE id = ANY(%s)", (whole,))
            return deleted

        return self._run(remove)

    def health(self):
        """None if the database answered in the last second (or answers now), else
        the cause of its fault."""
        if self._fault is None and time.monotonic() - self._checked < 1:
            return None
        try:
            self._run(lambda conn: conn.execute("SELECT 1"))
        except StorageError as exc:
            return exc.cause
        except RuntimeError:
            return "the store is closed"
        return None

    def counts(self):
        def count(conn):
            rows = conn.execute("SELECT status, sum(n) AS n, count(*) AS k FROM job_counts "
                                "GROUP BY status").fetchall()
            if sum(row["k"] for row in rows) > _PG_COUNT_ROWS:  # fold them: one row each
                conn.execute("WITH gone AS (DELETE FROM job_counts RETURNING status, n) "
                             "INSERT INTO job_counts SELECT status, sum(n) FROM gone "
                             "GROUP BY status")
            return {row["status"]: int(row["n"]) for row in rows}

        found = self._run(count)
        return {status: found.get(status, 0) for status in STATUSES}

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
        self._close_idle()

    def _close_idle(self):
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    # -- sharing the work with other nodes

    def join(self, node, lock=True, node_timeout=30):
        """Enter this node in the nodes table as `node`, and hold the advisory lock of
        that name for as long as the store is open: StoreInUse if another live
        process holds it. A node's name outlives it: a node that starts again
        under its name takes up the jobs it was running (held())."""
        self.node = node
        if not lock:  # (a pooler may hand a session's lock to any client): the entry
            if not self._enter(node_timeout):  # is a lease, taken when it has lapsed
                raise self._in_use(node)
            return
        conn = self._connect()
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS got",
                               (f"valet node {self.schema} {node}",)).fetchone()["got"]
        except self._pg.Error as exc:
            conn.close()
            raise self._failed(exc) from None
        if not got:
            conn.close()
            raise self._in_use(node)
        conn.execute(f"LISTEN {_pg_name(self.channel)}")  # (before it takes any job)
        self._listener = conn
        self._enter()

    def _enter(self, lapsed=None):
        """Write this node's entry; with `lapsed` (seconds), only over an entry of its
        name whose heartbeat is older than that. Whether it wrote."""
        node, where = self.node, ""
        if lapsed is not None:
            where = " WHERE nodes.heartbeat_at < now() - make_interval(secs => %s)"
        return self._run(lambda c: c.execute(
            "INSERT INTO nodes VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (name) DO "
            "UPDATE SET host = excluded.host, pid = excluded.pid, version = "
            "excluded.version, started_at = excluded.started_at, heartbeat_at = now()"
            + where, (node, socket.gethostname(), os.getpid(), __version__, time.time(),
                      *([lapsed] if where else []))).rowcount == 1)

    def _in_use(self, node):
        return StoreInUse(f"a valet node named {node!r} is running on {self.where} "
                          f"already; give this one another storage.postgres.node (or "
                          f"another server.port)")

    def leave(self):
        """Take this node out of the nodes table (it stops; it runs nothing now), let go
        of its name, and end listen()."""
        try:
            self._run(lambda conn: conn.execute("DELETE FROM nodes WHERE name = %s",
                                                (self.node,)))
        finally:
            if self._listener is not None:
                self._listener.close()  # (listen() returns, its `stopped` being set)

    def held(self):
        """The jobs IN_PROGRESS on this node: at start, those its last run left."""
        return self._read(f"SELECT {_PG_JOB} FROM jobs WHERE status = 'IN_PROGRESS' AND "
                          f"node = %s ORDER BY seq", (self.node,))

    def taken_from(self, job_ids):
        """{id: the node it was taken over from} of those of these jobs this node took
        over from a dead one (and has not settled yet)."""
        return {row["id"]: row["taken_from"] for row in self._read(
            "SELECT id, taken_from FROM jobs WHERE id = ANY(%s) AND status = 'IN_PROGRESS' "
            "AND node = %s AND taken_from IS NOT NULL", (list(job_ids), self.node))}

    def claim(self, n, now, promote=True):
        """Start up to `n` ready jobs on this node: first make the SCHEDULED jobs that
        are due by `now` PENDING (for any node to take: one statement), then (one
        more) move the `n` first PENDING jobs whose turn it is (highest priority
        first, then in the order they became ready) to IN_PROGRESS, one attempt
        more, with started_at set if it was not. SKIP LOCKED: a job another node is
        taking is left to it.
        Returns ([(since when it was ready, the started record)], in that order; the
        earliest run_at of a job still SCHEDULED, or None)."""
        def take(conn):
            if promote:
                conn.execute(
                    "UPDATE jobs SET status = 'PENDING', ready_at = run_at WHERE id IN ("
                    "SELECT id FROM jobs WHERE status = 'SCHEDULED' AND run_at <= %s "
                    "ORDER BY run_at LIMIT 1000 "
                    "FOR UPDATE SKIP LOCKED)", (now,))
            started = conn.execute(
                f"UPDATE jobs SET status = 'IN_PROGRESS', attempts = attempts + 1, "
                f"started_at = coalesce(started_at, %s), node = %s, taken_from = NULL "
                f"WHERE EXISTS ("
                f"SELECT 1 FROM nodes WHERE name = %s) AND id IN ("
                f"SELECT id FROM jobs WHERE {_PG_TURN} "
                f"ORDER BY priority DESC, ready_at, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_PG_JOB}, ready_at", (now, self.node, self.node, n)
            ).fetchall() if n else []
            due = conn.execute("SELECT min(run_at) AS due FROM jobs WHERE status = "
                               "'SCHEDULED'").fetchone()["due"]
            return started, due

        started, due = self._run(take, transaction=False)  # (each statement atomic)
        started.sort(key=lambda job: (-job["priority"], job["ready_at"], job["seq"]))
        return [(job.pop("ready_at"), self._out(job)) for job in started], due

    def unclaim(self, jobs):
        """Give back jobs claim() started here that never ran ({id: attempts}): PENDING
        again, as they were before (the attempt and first start undone), for any
        node to take. Returns how many."""
        if not jobs:
            return 0
        return self._run(lambda conn: conn.execute(
            "UPDATE jobs AS j SET status = 'PENDING', attempts = j.attempts - 1, node = NULL, "
            "started_at = CASE WHEN j.attempts = 1 THEN NULL ELSE j.started_at END "
            "FROM unnest(%s::text[], %s::int[]) AS given (id, attempts) WHERE j.id = "
            "given.id AND j.attempts = given.attempts AND status = 'IN_PROGRESS' AND "
            "node = %s", (list(jobs), list(jobs.values()), self.node)).rowcount)

    def waiting(self):
        """{"waiting": how many jobs are ready and not taken, "oldest": since when (wall
        clock) the oldest of them has been ready, or None}."""
        return self._run(lambda conn: conn.execute(
            f"SELECT count(*) AS waiting, min(ready_at) AS oldest FROM jobs WHERE "
            f"{_PG_TURN}").fetchone())

    def beat(self, node_timeout):
        """The heartbeat: mark this node alive now (on the database's clock). Then take
        out every node silent for longer than `node_timeout` seconds, and take over
        the jobs running under a name no node has. Returns (whether this node's own
        entry was gone, having been taken for dead; [(a gone node's name, seconds
        it was silent or None if it had left, the records of the jobs it was
        running, now this node's)])."""
        def beat(conn):
            lost = conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE name = %s",
                                (self.node,)).rowcount == 0
            if lost:
                conn.execute("INSERT INTO nodes VALUES (%s, %s, %s, %s, %s, now())",
                             (self.node, socket.gethostname(), os.getpid(), __version__,
                              time.time()))
            silent = {row["name"]: row["silent"] for row in conn.execute(
                "DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => %s) "
                "RETURNING name, extract(epoch FROM now() - heartbeat_at)::float AS silent",
                (node_timeout,))}
            # Every job running under a name no node has now: the dead ones', and any a
            # node left behind (it stopped while the store failed).
            jobs = conn.execute(
                f"UPDATE jobs AS j SET node = %s, taken_from = coalesce(was.node, '-') FROM "
                f"(SELECT id, node FROM jobs AS o WHERE "
                f"status = 'IN_PROGRESS' AND NOT EXISTS (SELECT 1 FROM nodes WHERE name = "
                f"o.node) FOR UPDATE) AS was WHERE j.id = was.id RETURNING "
                f"{', '.join('j.' + c for c in _JOB_COLUMNS)}, was.node AS was",
                (self.node,)).fetchall()
            by_node = {}
            for job in sorted(jobs, key=lambda job: job["seq"]):
                by_node.setdefault(job.pop("was"), []).append(self._out(job))
            return lost, [(name, silent.get(name), held) for name, held in by_node.items()]

        return self._run(beat)

    def moved(self, jobs):
        """Of `jobs` ({id: attempts}, jobs this node runs), the notices of those that
        another node has ended (or deleted) since: listen()'s, found by looking."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT id, attempts, status, node FROM jobs WHERE id = ANY(%s)",
            (list(jobs),)).fetchall()) if jobs else []
        found = {row["id"]: row for row in rows}
        notices = []
        for job_id, attempts in jobs.items():
            row = found.get(job_id)
            if row is None:
                notices.append(f"job {job_id} {attempts} DELETED -")
            elif row["attempts"] != attempts:  # a later attempt started since
                notices.append(f"job {job_id} {attempts} SUPERSEDED {row['node'] or '-'}")
            elif row["status"] != IN_PROGRESS or row["node"] != self.node:
                notices.append(self._moved(row))
        return notices

    def nodes(self):
        """The nodes alive: [{"name", "host", "pid", "version", "started_at",
        "heartbeat_age" (seconds since its last heartbeat)}], by name."""
        return self._run(lambda conn: conn.execute(
            "SELECT name, host, pid, version, started_at, "
            "extract(epoch FROM now() - heartbeat_at)::float AS heartbeat_age "
            "FROM nodes ORDER BY name").fetchall())

    def listen(self, heard, stopped, poll):
        """Pass each notice of the other nodes (and this one) to heard(message), on
        the calling thread, until `stopped` (an Event) is set. When the connection
        is lost, it connects again, and calls heard("lost"): something may have
        been missed. Checks `stopped` every `poll` seconds."""
        conn = self._listener  # (listening since join())
        while not stopped.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self._listener = self._connect()
                    conn.execute(f"LISTEN {_pg_name(self.channel)}")  # then look: what
                    if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS got",
                                        (f"valet node {self.schema} {self.node}",)
                                        ).fetchone()["got"]:  # changed is seen either way
                        log.error("storage: another process has taken this node's name "
                                  "(%s) while its connection was lost", self.node)
                    heard("lost")
                for notice in conn.notifies(timeout=poll):
                    try:
                        heard(notice.payload)
                    except Exception:  # (a notice must never end the hearing)
                        log.exception("storage: a notice could not be handled: %r",
                                      notice.payload[:200])
                    if stopped.is_set():
                        break
            except (self._pg.Error, StorageError) as exc:
                if stopped.is_set() or self._closed:
                    return
                log.warning("storage: lost the connection that hears the other nodes "
                            "(%s); connecting again", _one_line(exc) or type(exc).__name__)
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                stopped.wait(min(poll, 1))


def _open_store(config):
    """The store config's storage.option names."""
    if config["storage.option"] == "memory":
        return MemoryStore()
    if config["storage.option"] == "postgres":
        return PostgresStore(config["storage.postgres.dsn"], config["storage.postgres.schema"],
                             connections=config["storage.postgres.connections"])
    return SqliteStore(_in_folder(config, config["storage.sqlite.path"]),
                       config["storage.sqlite.synchronous"])


# ---------------------------------------------------------------- lifecycle --

def _check_move(from_states, to_state):
    for state in from_states:
        if to_state not in _MOVES[state]:
            raise InvalidTransition(f"{state} -> {to_state} is not an allowed move")


def _backoff(base, attempts):
    """Seconds to wait before the retry that follows failed attempt number `attempts`:
    doubling from `base`, capped, with jitter (half to all of it) so that jobs that
    failed together do not all retry at the same moment."""
    delay = min(_MAX_BACKOFF, base * 2 ** min(attempts - 1, 32))
    return delay * random.uniform(0.5, 1.0)


def _why_not_deletable(job):
    """Why a job cannot be deleted on its own now, or None if it can."""
    if job["pipeline_id"] is not None:
        return (f"job {job['id']!r} belongs to pipeline {job['pipeline_id']!r}; delete the "
                f"pipeline instead")
    if job["status"] == IN_PROGRESS:
        return f"job {job['id']!r} is running; cancel it, or delete it once it has finished"
    return None


def _why_not_retryable(job):
    """Why a job cannot be retried by request now, or None if it can."""
    if job["pipeline_id"] is not None:
        return (f"job {job['id']!r} belongs to pipeline {job['pipeline_id']!r}; a job of "
                f"a pipeline cannot be retried on its own")
    if job["status"] not in (FAILED, CANCELLED):
        return (f"job {job['id']!r} is {job['status']}; only a FAILED or CANCELLED job "
                f"can be retried")
    return None


def _why_pipeline_not_deletable(pipeline):
    """Why a pipeline cannot be deleted now (it is running), or None if it can."""
    if _pipeline_status(pipeline["jobs"]) == IN_PROGRESS:
        return (f"pipeline {pipeline['id']!r} is running; cancel it, or delete it once it "
                f"has finished")
    return None


class _Move:
    """A transition for the lifecycle to make (the arguments of the store's), and
    `after`, what follows it once made: called with the moved record."""

    __slots__ = ("args", "after")

    def __init__(self, job_id, from_states, to_state, fields=None, result=None, then=(),
                 after=None):
        self.args = (job_id, from_states, to_state, fields, result, then)
        self.after = after


class _Lifecycle:
    """Where every job's status changes, and what follows from each change.

    Each move has a method named after it, which makes it with one transition of
    the store: accept (a new job), promote (SCHEDULED -> PENDING), start (PENDING ->
    IN_PROGRESS), and the ends of an attempt: complete, retry (back to SCHEDULED),
    fail and cancel (which cancel the rest of a pipeline in the same write). After
    a move it queues or schedules what comes next, gives back backlog places and
    wakes the callers waiting for the job (the result waiters). The worker pool
    calls start() and settle(); the scheduler calls promote(); the facade calls
    the rest. The rules of which status may follow which are here and in _MOVES,
    nowhere else.
    """

    def __init__(self, store, scheduler, clock=time.time, metrics=None):
        self.store = store
        self.scheduler = scheduler
        self.metrics = metrics if metrics is not None else _Metrics()  # jobs counted
        self.pool = None  # the _WorkerPool, set by its owner: the two call each other
        self.node = None  # the _Node, when the store is shared by several valet processes
        self.recovered = False  # recover() has settled what the last run left running
        self._clock = clock  # the wall clock, for the times a job records
        self._lock = threading.Lock()  # guards _waiters
        self._waiters = {}  # job id -> Events of callers waiting for its next change
        self._halted = threading.Event()  # valet is stopping: persist() gives up

    def persist(self, step, *args, **kwargs):
        """step(*args, **kwargs), again and again while the store fails, waiting 50 ms
        at first and doubling up to 5 s, until it succeeds or valet stops (then the
        StorageError is raised). For the writes no client is there to retry, those
        of workers and the scheduler: when a fault clears, they go on by
        themselves, and no job is left behind."""
        delay = 0.05
        while True:
            try:
                return step(*args, **kwargs)
            except StorageError:
                if self._halted.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def halt(self):
        """valet is stopping: persist() stops retrying."""
        self._halted.set()

    def _make(self, *moves):
        """Make moves (_Move) in one write of the store, each checked against _MOVES,
        then what follows each one that applied. The one call of the store's
        transitions(): returns each move's record (None where it did not apply)."""
        for move in moves:
            _, from_states, to_state, _, _, then = move.args
            _check_move(from_states, to_state)
            for _, states, state, _ in then:
                _check_move(states, state)
        records = self.store.transitions(*(move.args for move in moves))
        for move, record in zip(moves, records):
            if record is not None:
                self._count(record, move.args[1])
                if move.after is not None:
                    move.after(record)
        return records

    def _transition(self, job_id, from_states, to_state, fields=None, result=None, then=()):
        """One move, with nothing to follow it: the moved record, or None."""
        return self._make(_Move(job_id, from_states, to_state, fields, result, then))[0]

    def _count(self, moved, from_states):
        """Count a move for GET /metrics: a job that ended, or that runs again."""
        task, status = moved["task_name"], moved["status"]
        if status in FINISHED:
            self.metrics.finished(task, status, moved["failure_reason"])
        elif (status == SCHEDULED and IN_PROGRESS in from_states) or (
                status == PENDING and from_states == (FAILED, CANCELLED)):  # by request
            self.metrics.count("valet_job_retries_total", (("task", task),))

    # -- a new job

    def accept(self, *jobs, pipeline=None, fired=None, key=None) -> bool:
        """Store new jobs (one, or a pipeline's in order, with `pipeline`), then queue
        the first, or schedule it if its run_at is to come: it is SCHEDULED until
        then, and every other job PENDING (a pipeline's later jobs wait for their
        turn). A job queued at once takes a place in the backlog before it is
        stored (BacklogFull if there is none), except a periodic firing: `fired`,
        (entry name, due time), which the store records with the job. Returns
        False, storing nothing, if that firing, or the idempotency `key` (key,
        digest), was recorded before."""
        first = jobs[0]
        if first["run_at"] is not None and first["run_at"] > first["created_at"]:
            first["status"] = SCHEDULED
        reserved = first["status"] == PENDING and fired is None
        if reserved:
            self.pool.reserve()
        try:
            stored = self.store.add(*jobs, pipeline=pipeline, fired=fired, key=key)
        except BaseException:
            if reserved:
                self.pool.unreserve()
            raise
        if not stored:  # the firing, or the idempotency key, was recorded before
            if reserved:
                self.pool.unreserve()
            return False
        for job in jobs:
            self.metrics.count("valet_jobs_submitted_total", (("task", job["task_name"]),))
        if first["status"] == SCHEDULED:
            self._schedule(first["id"], first["run_at"])
        else:
            self._queue(first, reserved=reserved, since=first["created_at"])
        if pipeline is None:
            log.debug("job %s: created %s (task %s)", first["id"], first["status"],
                      first["task_name"])
        else:
            log.debug("pipeline %s: created with %d jobs, the first %s", pipeline["id"],
                      len(jobs), first["status"])
        return True

    def _queue(self, job, reserved=True, since=None):
        """A stored job is PENDING and its turn has come: queue it for a worker. (With
        several nodes, the nodes' workers take it from the store: wake this one's.)"""
        if self.node is None:
            self.pool.enqueue(job, reserved=reserved, since=since)
            return
        if reserved:
            self.pool.unreserve()
        self.node.added()

    def _schedule(self, job_id, run_at):
        """A stored job is SCHEDULED: promote it at `run_at`. (With several nodes, the
        first node free when it is due takes it.)"""
        if self.node is None:
            self.scheduler.at(run_at, self.promote, job_id, run_at)
        else:  # (the node also learns of it from the store: this is to the millisecond)
            self.scheduler.at(run_at, self.node.wake)
            self.node.wake()

    def recover(self):
        """Take up what the last run left in the store: schedule its scheduled jobs,
        settle the jobs it was running (a failed attempt, retried if the job has
        retries left), and queue its pending jobs whose turn it is, in order. With
        several nodes, only the jobs this node was running are its to settle; the
        rest is in the store for every node to take."""
        if self.node is not None:
            held = self.store.held()
            for job in held:
                self.finish(job, FAILED, reason="the server stopped while the job was running")
            if held:
                log.info("from the store: %d job(s) this node was running settled", len(held))
            self.recovered = True
            return
        scheduled = list(self._stored(SCHEDULED))
        for job in scheduled:
            self.scheduler.at(job["run_at"], self.promote, job["id"], job["run_at"])
        for job in list(self._stored(IN_PROGRESS)):
            self.finish(job, FAILED, reason="the server stopped while the job was running")
        queued = 0
        for job in list(self._stored(PENDING)):
            previous = job["previous_job_id"] and self.store.get(job["previous_job_id"])
            if not previous or previous["status"] == COMPLETED:  # its turn in a pipeline
                # (A job that ran before was retried by request at a time not kept.)
                ready = self._clock() if job["attempts"] else max(
                    job["created_at"], job["run_at"] or 0,
                    previous["completed_at"] if previous else 0)
                self.pool.enqueue(job, reserved=False, since=ready)
                queued += 1
        if queued or scheduled:
            log.info("from the store: %d pending job(s) queued, %d scheduled", queued,
                     len(scheduled))
        self.recovered = True

    def _stored(self, status):
        """Every stored job with this status, in submission order."""
        after = 0
        while True:
            jobs = self.store.list(status, after, MAX_PAGE_SIZE)
            yield from jobs
            if len(jobs) < MAX_PAGE_SIZE:
                return
            after = jobs[-1]["seq"]

    # -- the moves

    def promote(self, job_id, due):
        """SCHEDULED -> PENDING: a scheduled job, or a retry, has come due at `due` (its
        run_at when it was scheduled); queue it. A job scheduled again since (cancelled,
        retried by request, failed and waiting for a later retry) keeps waiting."""
        scheduled = self.persist(self.store.get, job_id)
        if scheduled is None or scheduled["run_at"] != due:
            return
        job = self.persist(self._transition, job_id, (SCHEDULED,), PENDING)
        if job is not None:
            log.debug("job %s: %s -> %s", job_id, SCHEDULED, PENDING)
            self.pool.enqueue(job, reserved=False, since=due)

    def start(self, job):
        """PENDING -> IN_PROGRESS, for the worker that took `job` (its record as it was
        queued) off the queue: one more attempt; started_at stays the first
        attempt's. The started record, or None if the job was cancelled or
        deleted meanwhile."""
        return self._make(self._start(job))[0]

    def _start(self, job):
        first_start = job["started_at"] if job["started_at"] is not None else self._clock()
        return _Move(job["id"], (PENDING,), IN_PROGRESS,
                     {"attempts": job["attempts"] + 1, "started_at": first_start},
                     after=lambda started: log.debug(
                         "job %s: %s -> %s (attempt %d)", job["id"], PENDING, IN_PROGRESS,
                         started["attempts"]))

    def settle(self, claim, status, value=None, reason=None, trace=None, then_start=None):
        """End the running attempt a worker claimed, as whoever took the claim (the
        worker when its task returned, the deadline thread, stop): finish() it, then
        release the claim and wake the job's waiters. With `then_start`, the record
        of a job the worker took off the queue, that job's start is written with
        the end, in one commit. Returns [the ended record, the started one] (None
        for a move that did not apply). The write is retried while the store
        fails (persist()); if valet stops first, the claim is given back for stop
        or the next start to settle, and the error raised."""
        settled = False
        try:
            records = self.persist(lambda: self._make(
                self._finish(claim.job, status, value, reason, trace),
                *([] if then_start is None else [self._start(then_start)])))
            settled = True
            return records
        finally:
            self.pool.release(claim, settled)
            self.wake(claim.job_id)

    def finish(self, job, status, value=None, reason=None, trace=None):
        """End a running attempt (`job` is its IN_PROGRESS record): COMPLETED with the
        task's value, or FAILED for `reason` (with the task's traceback, `trace`, if
        it raised), retried if the job has retries left. Returns the moved record,
        or None if the job was no longer IN_PROGRESS."""
        return self._make(self._finish(job, status, value, reason, trace))[0]

    def _finish(self, job, status, value, reason, trace):
        if status == COMPLETED:
            return self._complete(job, value)
        if job["attempts"] <= job["max_retries"]:
            return self._retry(job, reason, trace)
        return self._fail(job, reason, trace)

    def _complete(self, job, value):
        """IN_PROGRESS -> COMPLETED, with the result; then the pipeline's next job."""
        def after(done):
            log.debug("job %s: %s -> %s", job["id"], IN_PROGRESS, COMPLETED)
            if job["next_job_id"] is not None:  # (retried: the move is made)
                following = self.persist(self.store.get, job["next_job_id"])
                if following is not None and following["status"] == PENDING:
                    self._queue(following, reserved=False)

        return _Move(job["id"], (IN_PROGRESS,), COMPLETED,
                     {"completed_at": self._clock(), "failure_reason": None,
                      "failure_traceback": None, "attempts": job["attempts"]},
                     result=(value, None), after=after)

    def _retry(self, job, reason, trace=None):
        """IN_PROGRESS -> SCHEDULED: a failed attempt with retries left waits for its
        backoff, then comes due like a scheduled job."""
        run_at = self._clock() + _backoff(job["retry_backoff"], max(1, job["attempts"]))

        def after(moved):
            log.info("job %s: attempt %d failed (%s); retry %d of %d at %s", job["id"],
                     moved["attempts"], reason, moved["attempts"], moved["max_retries"],
                     _rfc3339(run_at))
            self._schedule(job["id"], run_at)

        return _Move(job["id"], (IN_PROGRESS,), SCHEDULED,
                     {"run_at": run_at, "failure_reason": reason, "failure_traceback": trace,
                      "attempts": job["attempts"]}, after=after)

    def _fail(self, job, reason, trace=None):
        """IN_PROGRESS -> FAILED, the reason kept as its result's error; the rest of
        its pipeline is cancelled with it."""
        return self._end(job, (IN_PROGRESS,), FAILED, reason, result=(None, reason),
                         trace=trace)

    def _cancel(self, job, reason, states=UNFINISHED):
        """SCHEDULED, PENDING or IN_PROGRESS (those of `states`) -> CANCELLED, with no
        result; the rest of its pipeline is cancelled with it. The moved record."""
        return self._make(self._end(job, states, CANCELLED, reason, result=None))[0]

    def _end(self, job, from_states, status, reason, result, trace=None):
        """The move of a job to FAILED or CANCELLED, with the jobs after it in its
        pipeline that have not started to CANCELLED, in one write."""
        now = self._clock()
        later = self._rest_of_pipeline(job, status, now)

        def after(moved):
            log.info("job %s: %s -> %s (%s)", job["id"], job["status"], status, reason)
            for task, (later_id, *_) in later:
                self._forget(later_id)
                self.metrics.finished(task, CANCELLED)

        fields = {"completed_at": now, "failure_reason": reason, "failure_traceback": trace}
        if tuple(from_states) == (IN_PROGRESS,):  # the end of this attempt, no later one
            fields["attempts"] = job["attempts"]
        return _Move(job["id"], from_states, status, fields, result=result,
                     then=[move for _, move in later], after=after)

    def _rest_of_pipeline(self, job, status, now):
        """The moves that cancel the jobs after `job` in its pipeline that have not
        ended, each with its job's task: [(task name, move)]."""
        if job["next_job_id"] is None:
            return []
        pipeline = self.store.get_pipeline(job["pipeline_id"])
        jobs = pipeline["jobs"] if pipeline is not None else []
        ids = [j["id"] for j in jobs]
        if job["id"] not in ids:
            return []
        what = "failed" if status == FAILED else "was cancelled"
        reason = f"job {job['name']!r} ({job['id']}) before it in the pipeline {what}"
        return [(later["task_name"], (later["id"], (SCHEDULED, PENDING), CANCELLED,
                                      {"completed_at": now, "failure_reason": reason}))
                for later in jobs[ids.index(job["id"]) + 1:]
                if later["status"] in (SCHEDULED, PENDING)]

    def _forget(self, job_id):
        """A job ended or went without running: give back its backlog place, if it
        held one, and wake its waiters."""
        self.pool.withdraw(job_id)
        self.wake(job_id)

    # -- what a caller asks for

    def cancel(self, job_id, reason="cancelled by request"):
        """Cancel a job that has not finished: it never starts, or, if it runs, its
        task is told (context.cancelled) and its late result discarded. Returns
        (its record, or None if there is none; whether this call cancelled it): a
        job that finished first keeps its status."""
        while True:
            job = self.store.get(job_id)
            if job is None or job["status"] in FINISHED:
                return job, False
            claim, taken, withdrawn = self.pool.take(job_id)
            if claim is not None and not taken:  # a worker or the deadline thread is
                self._wait_for_release(claim)   # ending it
                continue
            if claim is None and job["status"] == IN_PROGRESS and self.recovered and (
                    self.node is None):
                # Its claim was released as we looked: it has moved on. (Or another
                # process runs it: wait, rather than spin, for it to move.)
                self._wait_for_change(job_id, 1)
                continue
            # With its claim the job is this call's; without one, it may be cancelled
            # only while no worker runs it: until a worker claims it, or before
            # recover() has settled the jobs the last run left IN_PROGRESS. With
            # several nodes, a job running on another is cancelled here, and that
            # node, told by the store, stops its task (_Node.heard).
            states = UNFINISHED if claim is not None or not self.recovered or (
                self.node is not None) else (SCHEDULED, PENDING)
            settled = False
            try:
                moved = self._cancel(claim.job if claim and claim.job else job, reason, states)
                settled = True
            finally:  # give back the claim (if the write failed, untaken: the worker
                if claim is not None:  # settles the job itself, or a cancel retries)
                    self.pool.release(claim, settled)
                if withdrawn is not None and not settled:  # the write failed: queued again
                    self.pool.enqueue(job, reserved=False, since=withdrawn)
                self.wake(job_id)
            if moved is not None:
                return moved, True
            # it moved first (a worker started it, or it finished): look again

    def _wait_for_release(self, claim):
        """Wait until the thread that took this claim has released it (or given it
        back): release() comes before the wake, so nothing is missed. That thread
        may be retrying a write the store refuses: past _SETTLE_WAIT seconds,
        StorageError, so that a client is not held for as long as a fault lasts."""
        with self.watching(claim.job_id) as changed:
            if claim.taken and not claim.released and not changed.wait(_SETTLE_WAIT):
                raise StorageError("the job's end is still being written",
                                   "cancel it again shortly")

    def _wait_for_change(self, job_id, timeout):
        with self.watching(job_id) as changed:
            changed.wait(timeout)

    def cancel_pipeline(self, pipeline_id):
        """Cancel what is left of a pipeline (its current job, and with it the rest).
        Returns its record with its jobs; NotFound, or Conflict if it has finished."""
        while True:
            pipeline = self.store.get_pipeline(pipeline_id)
            if pipeline is None or not pipeline["jobs"]:
                raise _not_found("pipeline", pipeline_id)
            status = _pipeline_status(pipeline["jobs"])
            if status in FINISHED:
                raise Conflict(f"pipeline {pipeline_id!r} has finished (status {status}); "
                               f"only one that has not can be cancelled")
            current = next(job for job in pipeline["jobs"] if job["status"] not in FINISHED)
            _, cancelled = self.cancel(current["id"], "cancelled by request: its pipeline "
                                                      "was cancelled")
            if cancelled:
                log.info("pipeline %s: cancelled", pipeline_id)
                return self.store.get_pipeline(pipeline_id)
            # that job finished just before: cancel from the next one

    def delete(self, job_id):
        """Delete a job that is not running and not part of a pipeline, with its
        result; it gives back its backlog place and never runs. NotFound, Conflict."""
        job = self.store.delete(job_id, lambda job: _why_not_deletable(job) is None)
        if job is None:
            raise _not_found("job", job_id)
        reason = _why_not_deletable(job)
        if reason is not None:
            raise Conflict(reason)
        self._forget(job_id)
        log.info("job %s: deleted (was %s)", job_id, job["status"])

    def delete_pipeline(self, pipeline_id):
        """Delete a pipeline that is not running, with its jobs and their results.
        NotFound, Conflict."""
        pipeline = self.store.delete_pipeline(
            pipeline_id, lambda pipeline: _why_pipeline_not_deletable(pipeline) is None)
        if pipeline is None or not pipeline["jobs"]:
            raise _not_found("pipeline", pipeline_id)
        reason = _why_pipeline_not_deletable(pipeline)
        if reason is not None:
            raise Conflict(reason)
        for job in pipeline["jobs"]:
            self._forget(job["id"])
        log.info("pipeline %s: deleted (was %s) with its %d jobs", pipeline_id,
                 _pipeline_status(pipeline["jobs"]), len(pipeline["jobs"]))

    def retry(self, job_id):
        """FAILED or CANCELLED -> PENDING, by request: the job runs again as a new
        attempt (its attempts go on counting), its result deleted with the move.
        It takes a backlog place (BacklogFull). NotFound; Conflict if it has not
        ended so, or belongs to a pipeline."""
        job = self.store.get(job_id)
        if job is None:
            raise _not_found("job", job_id)
        why = _why_not_retryable(job)
        if why is not None:
            raise Conflict(why)
        if self.pool.starting(job_id):
            raise Conflict(f"job {job_id!r} was cancelled as a worker took it, which is "
                           f"still writing its start; retry it again shortly")
        self.pool.reserve()
        try:
            moved = self._transition(job_id, (FAILED, CANCELLED), PENDING,
                                     {"completed_at": None, "run_at": None}, result=())
        except BaseException:
            self.pool.unreserve()
            raise
        if moved is None:  # deleted, or retried by another request, meanwhile
            self.pool.unreserve()
            job = self.store.get(job_id)
            raise _not_found("job", job_id) if job is None else Conflict(
                _why_not_retryable(job))
        self._queue(moved)
        log.info("job %s: %s -> %s (retried by request)", job_id, job["status"], PENDING)
        return moved

    def previous_result(self, job):
        """What the job before this one in its pipeline returned (None if nothing)."""
        previous = self.store.result(job["previous_job_id"])
        return None if previous is None else previous["value"]

    # -- the result waiters

    @contextlib.contextmanager
    def watching(self, job_id):
        """An Event set when the job's status next changes after it has started (it
        finishes, is retried, cancelled or deleted), or valet stops. Read the job
        after entering, so that a change just before is not missed."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[job_id]

    def wake(self, job_id):
        """Wake every caller waiting for this job."""
        with self._lock:
            events = self._waiters.pop(job_id, ())
        for event in events:
            event.set()

    def wake_all(self):
        """Wake every waiting caller: valet is stopping."""
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for events in waiters.values():
            for event in events:
                event.set()


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
    A worker process (worker_type: process) gives its task the same class.
    """

    def __init__(self, job_id, attempt, deadline, cancelled, report, clock=time.time):
        self.job_id = job_id
        self.attempt = attempt
        self.deadline = deadline
        self.cancelled = cancelled  # a threading.Event
        self._report = report       # called with each progress report (a dict)
        self._clock = clock

    def remaining(self):
        """Seconds left before the timeout (never below 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - self._clock())

    def progress(self, fraction, message=""):
        """Report how far the task has got: a number from 0 to 1 and a short message."""
        if not (_is_number(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"progress fraction must be a number from 0 to 1, "
                             f"got {fraction!r}")
        self._report({"fraction": fraction, "message": str(message)[:200]})


class _Claim:
    """A job a worker thread took off the queue. The first thread to take the claim
    (the worker when its task returns, the deadline thread, a cancel, stop) writes
    the job's end and then releases the claim; the others leave the job alone.
    So while valet runs, a job that is IN_PROGRESS always has a claim: if the
    write fails, the claim is given back, untaken and with no thread, for a
    cancel or stop to settle."""

    __slots__ = ("thread", "job_id", "job", "cancelled", "progress", "taken",
                 "released", "abandoned", "deadline", "starting", "ready", "began", "child",
                 "ending")

    def __init__(self, thread, job_id):
        self.thread = thread    # None once its job's end could not be written
        self.job_id = job_id
        self.job = None         # its record, once it is IN_PROGRESS
        self.cancelled = threading.Event()
        self.progress = None
        self.taken = False      # a thread has taken it to settle the job
        self.released = False   # its job is settled: the claim is done with
        self.abandoned = False  # taken from its thread, which left the pool
        self.deadline = False   # it has an entry in the pool's deadline heap
        self.starting = True    # its job's start is being written
        self.ready = None       # when (wall clock) its job was ready to run
        self.began = None       # when (monotonic) its attempt began, once it has
        self.child = None       # the worker process running its task (process mode)
        self.ending = False     # taken while that process ran it: it is told to stop

    def report(self, progress):
        """What the task last reported (Context.progress)."""
        self.progress = progress


_STOP = object()  # put on the ready queue, one per worker, to end it
_UNSTARTED = object()  # a claimed job whose start is yet to be written


def _reason_of(exc):
    """`ValueError: bad input`, for a task's exception (even one whose str() fails)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its message could not be read)"


def _traceback_of(exc):
    """A task's traceback as text, its last _MAX_TRACEBACK characters at most (None if
    the exception will not be formatted)."""
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        return None
    return text if len(text) <= _MAX_TRACEBACK else "..." + text[-_MAX_TRACEBACK:]


def _guarded(step, *args):
    """Run one step of a thread's loop; an error (the store's, say) is logged, and
    the thread goes on. A job it left behind is settled at the next start."""
    try:
        return step(*args)
    except StorageError as exc:  # valet is stopping while the store fails
        log.warning("%s: %s", threading.current_thread().name, exc)
        return True
    except Exception:
        log.exception("%s: unexpected error", threading.current_thread().name)
        return True


# Worker processes (worker_type: process). Each runs _child_main() in a fresh
# Python, whose program is the source of the few functions below that it needs
# (see _child_program, sent as its first frame), so that it imports nothing of
# valet's own and starts in tens of milliseconds. valet and it exchange frames
# (_write_frame) over its stdin and stdout, each a JSON object except the tasks.

def _write_frame(stream, data):
    """Write one frame: its length in 4 bytes (big-endian), then its bytes."""
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def _read_frame(stream):
    """Read one frame written by _write_frame(); None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "big")
    data = stream.read(size)
    return data if len(data) == size else None


def _child_main():
    """A worker process: read the setup ({"path": sys.path, "memory_limit": MB or
    null}) and the tasks (pickled, so importing their modules), answer {"ready":
    pid}, then run the jobs sent, one at a time. While a task runs, its progress
    reports go back as {"progress": {...}}; then {"outcome": [status, value,
    reason, traceback]}, with "retire": true if the process ends after it (it ran
    out of memory). A frame {"cancel": true} sets the running task's
    context.cancelled. The end of stdin (valet closed it, or died) ends the
    process at once, even while a task runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # valet ends its worker processes
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # itself (a Ctrl-C reaches them too)
    stdin, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what a task prints goes to valet's stderr, not between the frames
    writing = threading.Lock()  # (a task's own threads may report progress)

    def send(message):
        data = json.dumps(message, allow_nan=False).encode()
        with writing:
            _write_frame(out, data)

    setup = json.loads(_read_frame(stdin))
    sys.path[:] = setup["path"]
    limit = setup["memory_limit"]
    try:
        tasks = pickle.loads(_read_frame(stdin))
        if limit is not None:
            _limit_memory(limit)
    except BaseException as exc:
        send({"error": _reason_of(exc)})
        return
    jobs, cancelled = queue.SimpleQueue(), threading.Event()

    def read():
        while (frame := _read_frame(stdin)) is not None:
            message = json.loads(frame)
            if message.get("cancel"):
                cancelled.set()
            else:  # (cleared here: a cancel frame right behind its job sets it)
                cancelled.clear()
                jobs.put(message)
        os._exit(0)

    threading.Thread(target=read, daemon=True).start()
    send({"ready": os.getpid()})
    _child_serve(tasks, jobs, cancelled, send, limit)
    os._exit(0)  # (now: the reader thread waits on stdin)


def _child_serve(tasks, jobs, cancelled, send, limit):
    """Run the jobs a worker process is sent, one at a time, and answer each."""
    while True:
        job = jobs.get()
        try:
            answer = _child_run(tasks[job["task"]], job, cancelled, send)
        except MemoryError as exc:  # (not the task's own)
            answer = {"outcome": [FAILED, None, _reason_of(exc), None], "retire": True}
        try:
            send(_out_of_memory(answer, limit))
        except (TypeError, ValueError, RecursionError, OverflowError) as exc:
            send({"outcome": [FAILED, None, f"the task's result is not JSON-serialisable: "
                                            f"{exc}", None]})
        except MemoryError:  # (encoding the result, say)
            answer = {"outcome": [FAILED, None, "MemoryError: sending the task's result",
                                  None], "retire": True}
            send(_out_of_memory(answer, limit))
        if answer.get("retire"):  # (a process out of memory may be in any state)
            return


def _out_of_memory(answer, limit):
    """An answer whose process ran out of memory ("retire") says so, with the limit."""
    if answer.get("retire") and limit is not None:
        answer["outcome"][2] = (f"{answer['outcome'][2].rstrip(': ')} (the worker process "
                                f"reached worker_pool.max_memory_per_child, {limit} MB)")
    return answer


def _limit_memory(megabytes):
    """Let this process grow by `megabytes` at most, from now (its address space)."""
    import resource  # (not on Windows)
    pages = int(open("/proc/self/statm").read().split()[0]) if os.path.exists(
        "/proc/self/statm") else 0  # (elsewhere, a limit of the whole size)
    allowed = pages * os.sysconf("SC_PAGE_SIZE") + megabytes * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (allowed, allowed))


def _child_run(fn, job, cancelled, send):
    """Run one job's task in a worker process; the answer to send back."""
    kwargs = {}
    if job["context"]:
        kwargs["context"] = Context(job["id"], job["attempt"], job["deadline"], cancelled,
                                    lambda progress: send({"progress": progress,
                                                           "id": job["id"]}))
    try:
        value = fn(*job["args"], **kwargs)
    except BaseException as exc:  # a task's failure must never end the process
        return {"outcome": [FAILED, None, _reason_of(exc), _traceback_of(exc)],
                "retire": isinstance(exc, MemoryError)}
    if _too_deep(value):
        return {"outcome": [FAILED, None, f"the task's result is nested more than "
                                          f"{_MAX_DEPTH} deep", None]}
    return {"outcome": [COMPLETED, value, None, None]}


# What a worker process is started with (`python -c _CHILD_BOOT valet-worker`, so
# that ps shows what it is): it reads its program from stdin, as the first frame.
_CHILD_BOOT = ("import sys; s = sys.stdin.buffer; exec(compile(s.read(int.from_bytes("
               "s.read(4), 'big')), '<valet worker process>', 'exec'))")


@functools.lru_cache(maxsize=None)
def _child_program():
    """The source a worker process runs: what _child_main() needs of this module."""
    parts = ["import json, math, os, pickle, queue, signal, sys, threading, time, "
             "traceback\n",
             f"COMPLETED, FAILED = {COMPLETED!r}, {FAILED!r}\n",
             f"_MAX_DEPTH, _MAX_TRACEBACK = {_MAX_DEPTH!r}, {_MAX_TRACEBACK!r}\n"]
    for fn in (_is_number, _too_deep, _reason_of, _traceback_of, Context, _write_frame,
               _read_frame, _limit_memory, _child_run, _out_of_memory, _child_serve,
               _child_main):
        parts.append(inspect.getsource(fn))
    return "\n".join(parts) + "\n_child_main()\n"


def _pickled_tasks(tasks):
    """The tasks pickled for worker processes, which import each by its module and
    name; ConfigError naming a task that cannot be (a lambda, a nested function,
    one of the script valet was started from)."""
    for name, fn in tasks.items():
        try:
            pickle.dumps(fn)
            problem = getattr(fn, "__module__", None) == "__main__" and (
                "it is defined in the script valet was started from")
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise ConfigError(f"worker_pool.worker_type: process runs tasks in other "
                              f"processes, which import them by name, but task {name!r} "
                              f"cannot be: {problem}; define it at the top level of a "
                              f"module (such as the tasks_module)")
    return pickle.dumps(tasks)


def _exit_reason(code, memory_limit, which="the worker process running the job"):
    """Why a worker process ended, from its exit code (negative: the signal)."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        reason = f"{which} was killed by {name}"
        if name == "SIGKILL":
            reason += " (kill -9, or the out-of-memory killer)"
        if memory_limit is not None:  # (a C library's failed allocation may abort)
            reason += f"; worker_pool.max_memory_per_child is {memory_limit} MB"
    else:
        reason = f"{which} exited with code {code}"
    return reason


class _Child:
    """A worker process, owned by the worker thread that sends it jobs, and a thread
    that reads its frames into `inbox` (then None, once it has exited)."""

    def __init__(self, setup, tasks):
        self.process = subprocess.Popen([sys.executable, "-c", _CHILD_BOOT, "valet-worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.process.pid
        self.jobs = 0  # jobs sent to it
        self.is_ready = False  # it has loaded the tasks (see ready())
        self.inbox = queue.SimpleQueue()
        threading.Thread(target=self._read, name=f"valet-child-{self.pid}",
                         daemon=True).start()
        self._write(_child_program().encode())
        self.send(setup)
        self._write(tasks)

    def _read(self):
        stream = self.process.stdout
        while (frame := _read_frame(stream)) is not None:
            try:
                self.inbox.put(json.loads(frame))
            except (ValueError, RecursionError) as exc:  # (a child is trusted: never seen)
                self.inbox.put({"outcome": [FAILED, None, f"the worker process sent what "
                                                          f"valet cannot read: {exc}", None]})
        stream.close()
        self.inbox.put(None)

    def _write(self, data):
        with contextlib.suppress(OSError, ValueError):  # it has exited: its reader says so
            _write_frame(self.process.stdin, data)

    def send(self, message):
        self._write(json.dumps(message).encode())

    def interrupt(self, claim):
        """Its job was taken (cancelled, timed out, stopped): tell its worker thread,
        with the claim (so that a late one cannot stop the next job)."""
        self.inbox.put(claim)

    def ready(self, timeout):
        """Wait for it to have loaded the tasks: None, or what went wrong."""
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return f"it did not start within {timeout:g} seconds"
        if message is None:
            return _exit_reason(self.process.wait(), None, "it")
        self.is_ready = "ready" in message
        return message.get("error")

    def end(self, grace):
        """Close its stdin, which ends it, and wait up to `grace` seconds; then kill it.
        Returns its exit code."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self):
        with contextlib.suppress(OSError):
            self.process.kill()
        return self.process.wait()


class _WorkerPool:
    """Worker threads that take jobs off a priority queue and run them, and a deadline
    thread that enforces timeouts. The lifecycle starts and settles each job.

    A job belongs to the thread running it while its _Claim is untaken; the first
    thread to take the claim (the worker, when the task returns; the deadline
    thread, when the deadline passes; a cancel; stop(), when the grace period runs
    out) settles the job, and the others drop what they have. A Python thread
    cannot be killed, so a worker whose job was taken from it is left to finish its
    task on its own: a replacement starts at once, and the old thread exits when
    the task returns, its late result discarded.

    With `processes` (worker_type: process: a dict of kill_grace, max_jobs and
    max_memory), each worker thread runs its tasks in a worker process of its own
    (a _Child) and only waits for it. A worker whose job was taken stays in the
    pool: it sets the task's context.cancelled, gives it kill_grace seconds to
    return, then kills the process and starts another. A process that dies fails
    its job and is replaced the same way.
    """

    def __init__(self, lifecycle, tasks, workers, capacity, timeout_unit,
                 clock=time.time, monotonic=time.monotonic, default_timeout=None,
                 processes=None):
        self.size = workers
        self.capacity = capacity
        self.default_timeout = default_timeout  # seconds, for a job that sets no timeout
        self.processes = processes  # None (worker threads), or the options of processes
        self._lifecycle = lifecycle
        self._tasks = tasks
        self._unit = timeout_unit
        self._clock = clock          # the wall clock: a task's context.deadline
        self._monotonic = monotonic  # the deadlines this pool enforces
        # (-priority, order, job record) of PENDING jobs: highest priority first, then FIFO
        self._ready = queue.PriorityQueue()
        self._order = itertools.count()
        self._names = itertools.count(1)
        self._context = {}  # task name -> whether its function takes a context argument
        self._deadline_thread = None
        self._lock = threading.Lock()  # guards every attribute below
        self._deadline_added = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)  # threads or claims changed
        self._reserved = 0     # submissions given a place in the backlog, not yet queued
        # id -> (the order of its live entry on the queue, since when (wall clock) it has
        # been ready to run, its attempts), in the order queued: an older entry of the
        # job, left by a cancel and a retry, is skipped; until a worker takes it or it
        # is withdrawn
        self._waiting = {}
        self._starting = {}    # job id -> workers writing its start (see starting())
        self._running = {}     # job id -> the _Claim of the thread that took it
        self._deadlines = []   # heap of (monotonic deadline, order, claim, timeout reason)
        self._stale = 0        # entries in _deadlines whose claim was released
        self._threads = set()  # the pool's worker threads (an abandoned one leaves it)
        self._abandoned = 0    # abandoned threads whose task has not returned yet
        self._stopping = False  # set by halt(): start no more jobs or workers
        self._enforcing = True  # the deadline thread runs until stop() has waited
        self._children = set()  # live worker processes (process mode)
        self._spare = []        # those start() made, for worker threads to take
        self._mine = threading.local()  # .child: the calling worker thread's process
        self._replaced = 0      # worker processes replaced: killed, died or recycled
        self._ending = 0        # workers whose process has a task to stop (claim.ending)
        self._halted = threading.Event()  # set by halt()
        self._idle = 0          # workers waiting for a job on the queue
        self.node = None  # the _Node, with several nodes: it queues only started jobs
        self.unstarted = {}  # id -> attempts of jobs queued, started, when halt() came
        # The tasks, pickled (by reference) for each worker process; ConfigError now,
        # at construction, for one that a process could not import by name.
        self._pickled = None if processes is None else _pickled_tasks(tasks)

    # -- the backlog: jobs accepted and waiting for a worker

    def reserve(self):
        """Take a place in the backlog, or raise BacklogFull. (With several nodes, the
        jobs waiting in the store, counted at most a poll interval ago, and afresh
        before a refusal.)"""
        if self.node is not None:  # (the other nodes' submissions, claims: now and then)
            self.node.count(unless_within=self.node.poll)
        for fresh in (False, True):
            if fresh and self.node is None:
                break
            if fresh:
                self.node.count()
            with self._lock:
                waiting = len(self._waiting) if self.node is None else self.node.waiting
                if waiting + self._reserved < self.capacity:
                    self._reserved += 1
                    return
        raise BacklogFull(f"the backlog is full (worker_pool.queue_capacity is "
                          f"{self.capacity}); try again shortly")

    def unreserve(self):
        """Give back a place reserve() took, for a job that was not stored."""
        with self._lock:
            self._reserved -= 1

    def enqueue(self, job, reserved=True, since=None):
        """Queue a stored PENDING job (its record), ready to run since `since` (wall
        clock; default now). Jobs accepted earlier (scheduled ones coming due, a
        pipeline's next job, start-up recovery) pass reserved=False: they take a
        place even when the backlog is full."""
        order = next(self._order)
        since = self._clock() if since is None else since
        with self._lock:
            self._reserved -= reserved
            if self._stopping and self.node is not None:  # (started as the pool halted)
                self.unstarted[job["id"]] = job["attempts"]
                return
            self._waiting.pop(job["id"], None)  # (last: _waiting is in the order queued)
            self._waiting[job["id"]] = (order, since, job["attempts"])
        self._ready.put((-job["priority"], order, job))

    def withdraw(self, job_id):
        """Forget a queued job that was deleted or cancelled: it gives back its place
        and never runs."""
        with self._lock:
            self._waiting.pop(job_id, None)

    def stats(self):
        """Queue depth, busy and abandoned workers, and since when (wall clock) the job
        queued longest ago has been ready (None when none waits); with worker
        processes, the pids of those alive and how many have been replaced. A worker
        whose process is being stopped (kill_grace) is busy."""
        with self._lock:
            stats = {"depth": len(self._waiting) + self._reserved,
                     "busy": len(self._running) + self._ending,
                     "abandoned": self._abandoned,
                     "oldest": next(iter(self._waiting.values()), (None, None, None))[1]}
            if self.node is not None:  # the jobs waiting in the store, for any node
                stats["depth"], stats["oldest"] = (self.node.waiting + self._reserved,
                                                   self.node.oldest)
            children = list(self._children)
            if self.processes is not None:
                stats["replaced"] = self._replaced
        if self.processes is not None:  # (poll() reaps a process that has died)
            stats["pids"] = sorted(c.pid for c in children if c.process.poll() is None)
        return stats

    def progress(self, job_id):
        """What the running job's task last reported, or None."""
        with self._lock:
            claim = self._running.get(job_id)
            return None if claim is None else claim.progress

    # -- claims

    def take(self, job_id):
        """Take a job out of the pool's hands, to cancel it: withdraw it from the
        queue, or take the claim on it from the worker that runs it (the worker
        leaves the pool, a replacement starts, and the task's context.cancelled is
        set). Returns (claim, taken, withdrawn): claim None if no worker holds the
        job; taken True if this call took the claim, which the caller releases
        once it has settled the job (False: another thread took it first);
        withdrawn, if the job was queued, since when it was ready (else None):
        enqueue it again, with that, if its cancel cannot be written."""
        with self._lock:
            withdrawn = self._waiting.pop(job_id, (None, None, None))[1]
            claim = self._running.get(job_id)
            if claim is None or claim.taken:
                return claim, False, withdrawn
            replace = self._take(claim)
        if replace:
            self._replace()
        return claim, True, withdrawn

    def drop(self, job_id, attempts):
        """A job this node has started (queued, or running) was ended by another node:
        cancelled there, or settled as this node's when it was taken for dead.
        Withdraw it, or take its claim (telling its task) and forget it, if it is
        the same attempt (`attempts`). Returns whether it was here."""
        with self._lock:
            claim = self._running.get(job_id)
            queued = self._waiting.get(job_id, (None, None, None))[2] == attempts
            if queued:  # (a queued job is one that the node has started)
                del self._waiting[job_id]
            if claim is None or claim.taken or claim.job is None or (
                    claim.job["attempts"] != attempts):
                return queued
            replace = self._take(claim)
        if replace:
            self._replace()
        self.release(claim)
        self._lifecycle.wake(job_id)
        return True

    def running(self):
        """{job id: attempts} of the jobs running here, and queued (started)."""
        with self._lock:
            running = {job_id: claim.job["attempts"] for job_id, claim in self._running.items()
                       if claim.job is not None and not claim.taken}
            return {**{job_id: entry[2] for job_id, entry in self._waiting.items()},
                    **running}

    def known(self):
        """The ids of the jobs queued or running here."""
        with self._lock:
            return set(self._waiting) | set(self._running)

    def idle(self):
        """How many workers wait for a job with none queued for them."""
        with self._lock:
            return 0 if self._stopping else max(0, self._idle - len(self._waiting))

    def _take(self, claim):
        """Take a claim, with the lock held. Its thread, if it has one, leaves the pool:
        returns whether a replacement is due."""
        claim.taken = True
        claim.cancelled.set()
        if claim.thread is None:
            return False
        if self.processes is not None:  # its worker stops the process, and stays
            if claim.child is not None:   # (busy until then, its job released or not)
                claim.child.interrupt(claim)
                claim.ending = True
                self._ending += 1
            return False
        claim.abandoned = True
        self._abandoned += 1
        self._threads.discard(claim.thread)
        self._changed.notify_all()
        return True

    def release(self, claim, settled=True):
        """Done with a taken claim: its job is settled, and the claim is forgotten
        (idempotent). With settled=False, its job's end could not be written: the
        claim is given back untaken and with no thread, and the job stays
        IN_PROGRESS until a cancel, stop or the next start settles it."""
        if self.node is not None:
            self.node.wake()  # a worker is free, or soon will be
        with self._lock:
            if claim.released:
                return
            self._changed.notify_all()  # its worker may wait for this (see _run)
            if not settled:
                claim.taken, claim.thread = False, None
                return
            claim.released = True
            if self._running.get(claim.job_id) is claim:
                del self._running[claim.job_id]
            if claim.deadline:  # its entry in the heap is stale now
                self._stale += 1
                self._prune_deadlines()
        if claim.began is not None:  # (once: a released claim returns above)
            self._lifecycle.metrics.observe("valet_job_run_seconds",
                                            (("task", claim.job["task_name"]),),
                                            self._monotonic() - claim.began)

    # -- a worker's single step

    def run_once(self, block=True, timeout=None, chain=False):
        """Take one job off the queue and run it to its end.

        Returns False when this thread should stop: it took the stop sentinel, or
        its job was taken from it (a timeout, a cancel) and a replacement has
        taken its place. Raises queue.Empty when not blocking (or after
        `timeout`) and nothing is queued. With `chain` (a worker thread's loop):
        if another job is ready when this one ends, take it too and write its
        start with this one's end, in one commit; the next call runs it.
        """
        job, claim, started = self._mine.__dict__.pop("next", (None, None, _UNSTARTED))
        if job is None:
            if self.processes is not None:
                self._prepared()
            with self._lock:
                self._idle += 1
            if self.node is not None:
                self.node.wake()  # (a worker free: the node claims a job for it)
            try:
                _, entry_order, job = self._ready.get(block, timeout)
            finally:
                with self._lock:
                    self._idle -= 1
            if job is _STOP:
                return False
            claim = self._claim(job, entry_order)
            if claim is None:
                return True
            if self.node is not None:  # the node started it in the store
                started = job
        try:
            return self._run(job, claim, started, chain)
        finally:
            self._let_go(claim)

    def _let_go(self, claim):
        """The thread is done with its claim: forget it if its job never started (an
        error; or it was cancelled or deleted first)."""
        with self._lock:
            self._started(claim)
            if claim.job is None and not claim.taken:
                del self._running[claim.job_id]
                self._changed.notify_all()
            if claim.abandoned:
                self._abandoned -= 1

    def _claim(self, job, entry_order):
        """Claim a job taken off the queue for the calling thread: its _Claim, or None
        if it was deleted or cancelled while queued (maybe queued again since, with
        an entry of its own), or is left for the next start."""
        with self._lock:
            order, ready, _ = self._waiting.get(job["id"], (None, None, None))
            if order != entry_order or self._stopping:
                return None
            del self._waiting[job["id"]]
            stale = self._running.get(job["id"])  # (with several nodes: an attempt that
            if stale is not None and stale.taken:  # another node took over, ended there,
                stale = None                       # and this node started again)
            replace = stale is not None and self._take(stale)
            claim = self._running[job["id"]] = _Claim(threading.current_thread(), job["id"])
            claim.ready = ready
            self._starting[job["id"]] = self._starting.get(job["id"], 0) + 1
        if stale is not None:
            log.info("job %s: a later attempt starts here; the task of the one before is "
                     "told to stop", job["id"])
            if replace:
                self._replace()
            self.release(stale)
        return claim

    def _following(self, job):
        """The next ready job and the calling thread's claim on it, if one is queued
        now (not blocking), for its start to be written with the end of `job`, the
        one this thread has run; else None. None too after a pipeline's job (its
        end queues the next, maybe ahead of others), in a thread that has left the
        pool, and while the thread's new worker process starts."""
        child = getattr(self._mine, "child", None)
        if self.node is not None or job["next_job_id"] is not None \
                or not self._in_pool(threading.current_thread()) \
                or (self.processes is not None and not (child and child.is_ready)):
            return None
        while not self._stopping:
            try:
                _, entry_order, job = self._ready.get_nowait()
            except queue.Empty:
                return None
            if job is _STOP:  # (for this thread: it stops after the job it has run)
                self._ready.put((-math.inf, entry_order, job))
                return None
            claim = self._claim(job, entry_order)
            if claim is not None:
                return job, claim
        return None

    def _started(self, claim):
        """The start of the claim's job is written, or will not be (with the lock held)."""
        if not claim.starting:
            return
        claim.starting = False
        left = self._starting.pop(claim.job_id) - 1
        if left:
            self._starting[claim.job_id] = left

    def starting(self, job_id):
        """Whether a worker is still writing the start of the job: it took the job off
        the queue before a cancel, and its write may yet find the job PENDING (if it
        was retried since), so no retry may make it PENDING until then."""
        with self._lock:
            return job_id in self._starting

    def _run(self, job, claim, started=_UNSTARTED, chain=False):
        """Run a claimed job: write its start (unless it was written with the end of
        the job before: `started`, its record, or None if it did not apply), call its
        task, and settle it (with the start of the next, if `chain`)."""
        if started is _UNSTARTED:
            started = self._lifecycle.persist(self._lifecycle.start, job)
        with self._lock:
            self._started(claim)
            if started is None or claim.taken:  # cancelled or deleted before it started
                return not claim.abandoned  # if so, the canceller started a replacement
            claim.job = started
            claim.began = self._monotonic()
            deadline = self._add_deadline(claim)
            if self._stopping:
                self._changed.notify_all()  # stop() waits for starts being written
        self._lifecycle.metrics.observe("valet_job_wait_seconds",
                                        (("task", started["task_name"]),),
                                        max(0.0, self._clock() - claim.ready))
        context = Context(started["id"], started["attempts"], deadline, claim.cancelled,
                          claim.report, self._clock)
        status, value, reason, trace = self._call(started, context, claim)
        with self._lock:
            mine, claim.taken = not claim.taken, True
            if not mine:  # log after the job's end, which the taker writes
                self._changed.wait_for(lambda: claim.released or not claim.taken)
                if not claim.released:  # the taker could not write it, and gave the
                    claim.taken = mine = True  # claim back: the task's own end stands
        if not mine:
            if claim.abandoned:
                log.info("job %s: the task of attempt %d returned after the attempt was "
                         "cancelled, timed out or stopped; its result is discarded",
                         started["id"], started["attempts"])
            return not claim.abandoned  # an abandoned thread has been replaced
        following = self._following(started) if chain else None
        if following is None:
            self._lifecycle.settle(claim, status, value, reason, trace)
            return True
        try:
            _, started = self._lifecycle.settle(claim, status, value, reason, trace,
                                                then_start=following[0])
        except BaseException:  # (valet stops while the store fails): queued again
            self._let_go(following[1])
            if not self._stopping:
                self.enqueue(following[0], reserved=False, since=following[1].ready)
            raise
        self._mine.next = (*following, started)
        return True

    def _add_deadline(self, claim):
        """Put a started job with a timeout in the deadline heap (with the lock held);
        its deadline on the wall clock, for the task's context, or None."""
        timeout = claim.job["timeout"]
        if timeout is None and self.default_timeout is None:
            return None
        if timeout is None:
            seconds = self.default_timeout
            reason = (f"{_TIMED_OUT} {seconds:g} second{'' if seconds == 1 else 's'} "
                      f"(worker_pool.default_timeout)")
        else:
            seconds = timeout / (1000 if self._unit == "millisecond" else 1)
            reason = f"{_TIMED_OUT} {timeout:g} {self._unit}{'' if timeout == 1 else 's'}"
        heapq.heappush(self._deadlines,
                       (self._monotonic() + seconds, next(self._order), claim, reason))
        claim.deadline = True
        self._deadline_added.notify()
        return self._clock() + seconds

    def _prune_deadlines(self):
        """Drop stale entries once they are most of the heap (with the lock held): a
        busy server with long timeouts would otherwise hold an entry per job until
        its deadline."""
        if self._stale * 2 > len(self._deadlines):
            self._deadlines = [d for d in self._deadlines if not d[2].released]
            heapq.heapify(self._deadlines)
            self._stale = 0

    def _call(self, job, context, claim):
        """Call the job's task outside every lock, in this thread or in its worker
        process: (status, value, failure reason, the task's traceback or None)."""
        fn = self._tasks.get(job["task_name"])
        if fn is None:
            return FAILED, None, f"task {job['task_name']!r} is not registered", None
        if job["task_name"] not in self._context:  # by name: a task need not be hashable
            self._context[job["task_name"]] = _takes_context(fn)
        args = [job["metadata"]]
        try:
            if job["use_previous_results"]:
                args.append(self._lifecycle.previous_result(job))
            if self.processes is not None:
                return self._in_child(job, args, context, claim)
            kwargs = {"context": context} if self._context[job["task_name"]] else {}
            value = fn(*args, **kwargs)
        except BaseException as exc:  # a task's failure must never end the worker
            reason, trace = _reason_of(exc), _traceback_of(exc)
            log.warning("job %s: task %s raised: %s", job["id"], job["task_name"], reason,
                        exc_info=trace is not None)  # (unless it cannot be formatted)
            return FAILED, None, reason, trace
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            return FAILED, None, f"the task's result is not JSON-serialisable: {exc}", None
        if text.count("[") + text.count("{") > _MAX_DEPTH and _too_deep(value):
            return (FAILED, None, f"the task's result is nested more than {_MAX_DEPTH} deep",
                    None)
        return COMPLETED, value, None, None

    # -- worker processes (process mode)

    def _in_child(self, job, args, context, claim):
        """_call() in this thread's worker process: send it the job, and wait for its
        outcome (see _outcome)."""
        child = self._child()
        if child.process.poll() is not None:  # it died while idle (killed from outside)
            log.warning("%s; another takes its place", _exit_reason(
                child.process.returncode, None, f"the worker process {child.pid}, idle,"))
            self._replace_child(child)
            child = self._prepared()
            if child is None:  # valet is stopping
                return FAILED, None, "the server stopped before the job could start", None
        with self._lock:
            if claim.taken:  # cancelled or timed out before it was sent: never sent
                return FAILED, None, None, None
            claim.child = child
        child.jobs += 1
        child.send({"id": job["id"], "task": job["task_name"], "args": args,
                    "context": self._context[job["task_name"]], "attempt": context.attempt,
                    "deadline": context.deadline})
        try:
            return self._outcome(child, job, claim)
        finally:
            with self._lock:  # no interrupt is meant for this job from here on
                claim.child = None
                self._ending -= claim.ending

    def _outcome(self, child, job, claim):
        """What the worker process running the job answers: its progress reports, kept,
        then its outcome. If it dies, the job fails, saying how it ended; if the job
        is taken from it (a timeout, a cancel, stop), its task is told through
        context.cancelled, and the process is killed kill_grace seconds later unless
        the task has returned by then. A process that dies, is killed, ran out of
        memory or has run max_jobs_per_child jobs is replaced."""
        until, grace = None, self.processes["kill_grace"]  # (until: when to kill it)
        while True:
            try:
                message = child.inbox.get(
                    timeout=None if until is None else max(0.0, until - time.monotonic()))
            except queue.Empty:
                log.info("job %s: its task did not stop within worker_pool.kill_grace "
                         "(%gs) of being told to: its worker process (pid %d) was killed",
                         job["id"], grace, child.pid)
                self._replace_child(child, kill=True)
                return (FAILED, None, f"the task did not stop within {grace:g}s of being "
                                      f"told to (worker_pool.kill_grace)", None)
            if isinstance(message, _Claim):  # (see interrupt())
                if message is claim and until is None:
                    child.send({"cancel": True})
                    until = time.monotonic() + grace
            elif message is None or "error" in message:  # it died, or could not start
                reason = (_exit_reason(child.process.wait(), self.processes["max_memory"])
                          if message is None else
                          f"the worker process could not start: {message['error']}")
                log.warning("job %s: %s (pid %d); another takes its place", job["id"],
                            reason, child.pid)
                self._replace_child(child, kill=message is not None)
                return FAILED, None, reason, None
            elif "progress" in message:
                if message["id"] == job["id"]:  # (not a late report of a job before)
                    claim.progress = message["progress"]
            elif "outcome" in message:  # (not "ready": a new process has started)
                most = self.processes["max_jobs"]
                if message.get("retire") or (most is not None and child.jobs >= most):
                    self._replace_child(child)
                status, value, reason, trace = message["outcome"]
                if trace is not None:
                    log.warning("job %s: task %s raised: %s\n%s", job["id"],
                                job["task_name"], reason, trace.rstrip())
                return status, value, reason, trace

    def _prepared(self):
        """The calling worker thread's process, once it has loaded the tasks, so that
        no job's time counts a start-up (None if valet stops first). While none can
        load them (the tasks module was broken since start), the worker takes no
        job: it tries again, 1 s later at first, up to 30 s apart."""
        delay = 1.0
        while not self._halted.is_set():
            child = self._child()
            problem = None if child.is_ready else child.ready(60)
            if problem is None:
                if delay > 1:
                    log.info("a worker process has loaded the tasks: jobs go on")
                return child
            log.error("a worker process could not load the tasks: %s; its worker takes "
                      "no job, and tries again in %gs", problem, delay)
            self._end_child(child, kill=True)
            self._mine.child = None
            if self._halted.wait(delay):
                break
            delay = min(delay * 2, 30.0)
        return None

    def _child(self):
        """The calling worker thread's process: its own, one start() made, or a new
        one."""
        child = getattr(self._mine, "child", None)
        if child is None:
            with self._lock:
                child = self._spare.pop() if self._spare else None
            self._mine.child = child = child or self._new_child()
        return child

    def _new_child(self):
        child = _Child({"path": sys.path, "memory_limit": self.processes["max_memory"]},
                       self._pickled)
        with self._lock:
            self._children.add(child)
        return child

    def _replace_child(self, child, kill=False):
        """End a worker process (kill it, or close it and wait for it) and start another
        for the calling thread, unless the pool is stopping."""
        self._end_child(child, kill)
        with self._lock:
            self._replaced += 1
            stopping = self._stopping
        self._mine.child = None if stopping else self._new_child()

    def _end_child(self, child, kill=False):
        if kill:
            child.kill()
        else:
            child.end(self.processes["kill_grace"])
        with self._lock:
            self._children.discard(child)

    def _start_children(self):
        """Start a process per worker and wait until each has loaded the tasks;
        ConfigError if one cannot (its error: the tasks cannot be imported there)."""
        children = [self._new_child() for _ in range(self.size)]
        problems = [problem for problem in (child.ready(60) for child in children)
                    if problem]
        if problems:
            for child in children:
                self._end_child(child, kill=True)
            raise ConfigError(f"worker_pool.worker_type: process: a worker process could "
                              f"not start: {problems[0]}")
        self._spare = children

    # -- the deadline thread's single step

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
                claim.deadline = False
                if claim.released:  # settled in time
                    self._stale -= 1
                    continue
                if claim.taken:  # another thread is settling it
                    continue
                overdue.append((claim, reason, self._take(claim)))
        for _, _, replace in overdue:
            if replace:
                self._replace()
        for claim, reason, _ in overdue:  # one that cannot be written leaves the rest be
            _guarded(self._lifecycle.settle, claim, FAILED, None, reason)
        return len(overdue)

    def _enforce_deadlines(self):
        while True:
            with self._lock:
                while self._enforcing:
                    if not self._deadlines:
                        self._deadline_added.wait()
                        continue
                    delay = self._deadlines[0][0] - self._monotonic()
                    if delay <= 0:
                        break
                    # Capped: a long wait is re-checked, never an overflow.
                    self._deadline_added.wait(min(delay, 3600))
                if not self._enforcing:
                    return
            _guarded(self.tick, self._monotonic())

    # -- threads

    def _in_pool(self, thread):
        with self._lock:
            return thread in self._threads

    def _replace(self):
        """Start a worker in place of an abandoned one (once the pool has started)."""
        if self._deadline_thread is not None:
            self._spawn()

    def _spawn(self):
        thread = threading.Thread(target=self._work, name=f"valet-worker-{next(self._names)}",
                                  daemon=True)
        with self._lock:
            if self._stopping:
                return
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # the process can start no more threads: go on one short
            log.exception("could not start a worker thread; the pool has one fewer")
            with self._lock:
                self._threads.discard(thread)

    def _work(self):
        # A thread stops when run_once says so, and also when it left the pool while
        # an error cut its job short (a cancel took the job, then the start failed).
        while True:
            go_on = _guarded(self.run_once, True, None, True)
            if "next" in self._mine.__dict__:  # a job started with the last one's end:
                continue                       # run it (or let go of it, if taken)
            if not (go_on and self._in_pool(threading.current_thread())):
                break
        child = getattr(self._mine, "child", None)
        if child is not None:
            self._end_child(child)
        with self._lock:
            self._threads.discard(threading.current_thread())
            self._changed.notify_all()

    def start(self):
        if self.processes is not None:
            self._start_children()
        self._deadline_thread = threading.Thread(target=self._enforce_deadlines,
                                                 name="valet-deadlines", daemon=True)
        self._deadline_thread.start()
        for _ in range(self.size):
            self._spawn()

    def halt(self):
        """Start no more jobs: those still queued stay PENDING in the store. (With
        several nodes, those queued were started in the store: unstarted lists
        them, for the node to give back.)"""
        with self._lock:
            self._stopping = True
            if self.node is not None:
                self.unstarted.update((job_id, entry[2]) for job_id, entry in
                                      self._waiting.items())
            self._waiting.clear()
        self._halted.set()

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
            self._changed.wait_for(lambda: not self._threads, grace)
            # A claim without a job is a start still being written: wait for it, so
            # that it is settled with the rest rather than run after stop returns.
            self._changed.wait_for(lambda: all(
                claim.job or claim.taken for claim in self._running.values()), 10)
            unfinished = [claim for claim in self._running.values()
                          if claim.job and not claim.taken]
            for claim in unfinished:
                self._take(claim)
            self._enforcing = False
            self._deadline_added.notify_all()
        for claim in unfinished:
            _guarded(self._lifecycle.settle, claim, FAILED, None,
                     f"the server stopped before the job finished (shutdown grace period: "
                     f"{grace:g}s)")
        if self._deadline_thread is not None:
            self._deadline_thread.join(10)
        if self.processes is not None:  # its workers end their processes as they exit
            with self._lock:
                self._changed.wait_for(lambda: not self._threads,
                                       self.processes["kill_grace"] + 5)
                children, self._spare = list(self._children), []
            for child in children:  # (a worker that never ran one, or one stuck)
                self._end_child(child, kill=True)


class _Node:
    """This process as one node of several that share a store (PostgresStore). No
    node leads: each takes work from the store for its own idle workers, and all
    of them watch over each other.

    Three threads. valet-claims starts ready jobs for the workers free here, in one
    statement of the store (claim(): SKIP LOCKED, so no two nodes start one job),
    and queues them for them: whenever work may be ready (a job added or ended on
    any node, heard through the store; a worker here free), when the earliest
    scheduled job comes due, and every `poll` seconds whatever it heard.
    valet-heartbeat beats every `heartbeat` seconds, settles the jobs of nodes
    silent for longer than `node_timeout` (and of names no node has) as after a
    crash (a failed attempt, retried if the job has retries left), and gives
    back the jobs started here that no worker has. valet-listen hears what the
    nodes write: a job that moved wakes its waiters here, and a job that another
    node ended while it runs here (cancelled it, or took it over from a node it
    took for dead) is stopped here. claim_once() and beat_once() are the single
    steps of the first two.
    """

    def __init__(self, name, store, lifecycle, pool, heartbeat, node_timeout, poll,
                 listen=True, clock=time.time):
        self.name = name
        self.store = store
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.poll = poll
        self.listen = listen
        # Jobs ready in the store and not taken, as last counted (count()), then less
        # those claimed here and more those added here; and since when (wall clock)
        # the oldest of them had been ready, when counted.
        self.waiting = 0
        self.oldest = None
        self._counted = -math.inf  # when (monotonic) waiting was last counted
        self._lifecycle = lifecycle
        self._pool = pool
        self._clock = clock
        self._due = None     # the earliest run_at of a SCHEDULED job, at the last claim
        self._claiming = threading.Lock()  # a claim, until its jobs are queued
        self._lock = threading.Lock()
        self._woken = threading.Condition(self._lock)  # guards _dirty
        self._dirty = True   # work may be ready since the last claim
        self._stopped = threading.Event()  # set by stop(): claim no more jobs
        self._left = threading.Event()     # set by leave(): the other threads end
        self._threads = []
        self.joined = False
        lifecycle.node = pool.node = self

    def join(self):
        """Enter the nodes table (StoreInUse if a live node has this name)."""
        self.store.join(self.name, lock=self.listen, node_timeout=self.node_timeout)
        self.joined = True

    def start(self):
        for name, target in (("valet-claims", self._claim_forever),
                             ("valet-heartbeat", self._beat_forever),
                             *([("valet-listen", self._listen)] if self.listen else [])):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self):
        """Claim no more jobs (call before the pool stops)."""
        self._stopped.set()
        self.wake()
        for thread in self._threads[:1]:  # (valet-claims, once started)
            thread.join(10)

    def leave(self):
        """Leave the nodes table, and stop the heartbeat and hearing the others (call
        once the pool has stopped: until then, they go on)."""
        self._left.set()
        if not self.joined:  # (its name may be a live node's)
            return
        with contextlib.suppress(StorageError, RuntimeError):
            given = self.store.unclaim(self._pool.unstarted)
            if given:
                log.info("node %s: %d job(s) it had started but not run are PENDING "
                         "again, for the other nodes", self.name, given)
        with contextlib.suppress(StorageError, RuntimeError):
            self.store.leave()  # (which ends listen())
        for thread in self._threads:
            thread.join(10)

    def wake(self):
        """Work may be ready: claim it soon."""
        with self._lock:
            self._dirty = True
            self._woken.notify()

    def added(self):
        """A job was stored here and is ready: count it waiting until the next claim."""
        with self._lock:
            self.waiting += 1
        self.wake()

    def count(self, unless_within=None):
        """Count the jobs waiting in the store afresh (unless counted within the last
        `unless_within` seconds)."""
        if unless_within is not None and time.monotonic() - self._counted < unless_within:
            return
        waiting = self.store.waiting()
        with self._lock:
            self.waiting, self.oldest = waiting["waiting"], waiting["oldest"]
            self._counted = time.monotonic()

    # -- claims

    def claim_once(self, limit=None):
        """Start as many ready jobs as there are workers free here (or `limit`), and
        queue them for them; returns how many. Also learns when the next scheduled
        job is due."""
        with self._claiming:
            now = self._clock()
            free = self._pool.idle() if limit is None else limit
            promote = self._due is None or self._due <= now
            started, self._due = self.store.claim(free, now, promote)
            with self._lock:  # (fewer wait now; how many, count() tells)
                self.waiting = max(0, self.waiting - len(started))
            for ready, job in started:
                log.debug("job %s: %s -> %s (attempt %d) on node %s", job["id"], PENDING,
                          IN_PROGRESS, job["attempts"], self.name)
                self._pool.enqueue(job, reserved=False, since=ready)
            return len(started)

    def _claim_forever(self):
        while not self._stopped.is_set():
            with self._lock:
                if not self._dirty:
                    wait = self.poll
                    if self._due is not None:
                        wait = min(wait, max(0.0, self._due - self._clock()))
                    self._woken.wait(wait)
                self._dirty = False
            if self._stopped.is_set():
                return
            if self._pool.idle() or (self._due is not None and self._due <= self._clock()):
                self._step(self.claim_once)
            if not self.listen:  # (hear, by looking, what no notice will tell)
                self._step(self.look_once)

    # -- heartbeats

    def beat_once(self):
        """Beat; settle the jobs of the nodes taken for dead (or gone, leaving jobs
        behind); give back the jobs started here that no worker has. Returns how
        many jobs it settled."""
        lost, taken = self.store.beat(self.node_timeout)
        if lost:
            log.error("node %s: the other nodes took this one for dead (no heartbeat for "
                      "over %gs: storage.postgres.node_timeout) and settled the jobs it "
                      "was running; it carries on", self.name, self.node_timeout)
            self.look_once()  # (its tasks of those jobs are told to stop)
        settled = 0
        for name, silent, jobs in taken:
            why = "" if silent is None else f" (no heartbeat for {silent:.0f}s)"
            log.warning("node %s: gone%s; settling the %d job(s) it was running", name,
                        why, len(jobs))
            for job in jobs:
                reason = f"the node {name} running the job stopped{why}"
                if self._lifecycle.persist(self._lifecycle.finish, job, FAILED,
                                           reason=reason) is not None:
                    settled += 1
        self._reconcile()
        return settled

    def _reconcile(self):
        """The jobs the store says this node runs that no worker here has: give back
        those a claim left started and never run (its answer was lost with the
        connection), and settle those a takeover left (its answer lost the same way),
        as the takeover would have."""
        with self._claiming:  # (a claim's jobs are queued before it lets go)
            known = self._pool.known()
            stray = {job["id"]: job for job in self.store.held() if job["id"] not in known}
            taken = self.store.taken_from(stray)
            given = self.store.unclaim({job_id: job["attempts"] for job_id, job in
                                        stray.items() if job_id not in taken})
        if given:
            log.warning("node %s: %d job(s) it had started but never run (the answer to a "
                        "claim was lost) are PENDING again", self.name, given)
        for job_id, name in taken.items():
            self._lifecycle.persist(self._lifecycle.finish, stray[job_id], FAILED,
                                    reason=f"the node {name} running the job stopped")

    def _beat_forever(self):
        while not self._left.wait(self.heartbeat):
            self._step(self.beat_once)

    def _step(self, step):
        """One step of a thread's loop. While the store fails (it logs the fault), the
        thread waits a poll interval before the next."""
        try:
            step()
        except StorageError:
            self._left.wait(self.poll)
        except Exception:
            log.exception("%s: unexpected error", threading.current_thread().name)
            self._left.wait(self.poll)

    # -- what the other nodes did

    def _listen(self):
        self.store.listen(self.heard, self._left, self.poll)

    def heard(self, message):
        """A notice from the store (see PostgresStore): wake the claims for "work";
        for a job's move, wake its waiters, and stop it here if another node ended
        it. "lost": notices may have been missed."""
        if message in ("work", "lost"):
            self.wake()
            if message == "lost":  # (what it may have missed: jobs ended elsewhere)
                self._lifecycle.wake_all()
                self._step(self.look_once)
            return
        parts = message.split(" ", 4)
        if len(parts) != 5 or parts[0] != "job" or not (
                parts[2].isdigit() or parts[2] == "-"):
            log.debug("node %s: a notice it does not know: %r", self.name, message[:200])
            return
        _, job_id, attempts, status, _ = parts
        self._lifecycle.wake(job_id)
        if status in (IN_PROGRESS, PENDING) or attempts == "-":
            return
        # That attempt has ended. If this node ended it, its claim was taken first, and
        # drop() does nothing; if another node did, the task here is told to stop.
        with self._claiming:  # (a job being claimed here is queued first)
            if self._pool.drop(job_id, int(attempts)):
                log.info("job %s: %s by another node; stopped here", job_id, status)

    def look_once(self):
        """Look in the store for the jobs running here that another node has ended (what
        listen would hear); returns how many were stopped here."""
        notices = self.store.moved(self._pool.running())
        for notice in notices:
            self.heard(notice)
        return len(notices)

    def nodes(self):
        """The nodes alive, this one marked, for /status."""
        return [dict(node, this=node["name"] == self.name) for node in self.store.nodes()]


# ---------------------------------------------------------------- scheduler --

class _Scheduler:
    """Runs actions at wall-clock times: scheduled jobs coming due, retries, periodic
    firings. A heap of (time, order, action, args) and a thread that sleeps on a
    Condition until the earliest entry is due, woken early when an earlier one is
    added; no polling.

    It owns the periodic entries of the config: start_periodic() plans each one's
    next firing, and every firing plans the one after it.
    """

    def __init__(self, clock=time.time, periodic=()):
        self.clock = clock  # epoch seconds; tests pass their own
        self.periodic = list(periodic)  # _Periodic entries, as load_config() parsed them
        self._order = itertools.count()
        self._thread = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # guards the three below
        self._heap = []
        self._running = True
        self._next_firing = {}  # periodic entry name -> epoch second it fires next
        self._last_firing = {}  # periodic entry name -> the due time it last fired at,
        # since valet started (the store's last firing may be an anchor, not a firing)

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

    # -- periodic entries

    def start_periodic(self, last_fired, fire):
        """Plan each periodic entry's next firing: at once for the latest due time it
        missed while valet was down (once, however many it missed), else when it is
        due. last_fired(name, now) is the due time of the entry's last firing (the
        store's periodic_last); fire(entry, due) creates its job for that due time."""
        now = self.clock()
        for entry in self.periodic:
            self._plan(entry, _next_due(entry.schedule, last_fired(entry["name"], now), now),
                       fire)

    def _plan(self, entry, due, fire):
        with self._lock:
            self._next_firing[entry["name"]] = due
        self.at(due, self._fire, entry, due, fire)

    def _fire(self, entry, due, fire):
        try:
            fire(entry, due)
            with self._lock:
                self._last_firing[entry["name"]] = due
        finally:  # a firing that failed (a full disk, say) does not end the schedule
            self._plan(entry, _next_due(entry.schedule, due, self.clock()), fire)

    def periodic_json(self):
        """The periodic entries, with the due time each fires at next and the one it
        last fired at (GET /periodic)."""
        with self._lock:
            return [{"name": entry["name"], "task_name": entry["task_name"],
                     "cron": entry.get("cron"), "every": entry.get("every"),
                     "next_run_at": _rfc3339(self._next_firing.get(entry["name"])),
                     "last_fired_at": _rfc3339(self._last_firing.get(entry["name"]))}
                    for entry in self.periodic]


# Periodic jobs: config entries that each create an ordinary job when due.

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 7))
_CRON_PART = re.compile(r"(\*|[0-9]{1,2})(?:-([0-9]{1,2}))?(?:/([0-9]{1,2}))?")
_CRON_STEPS = 5000  # a search gives up after this many steps: about five years


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
        self.seconds = _duration_seconds(value)

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


class _Periodic(dict):
    """A periodic entry of the config: the entry as written (so a loaded config still
    equals what was given), and `schedule`, its cron or every, parsed once."""

    schedule = None

    def job_fields(self):
        """The fields of the job each firing creates (those of a POST /jobs body)."""
        return {key: value for key, value in self.items() if key not in ("cron", "every")}


def _periodic_entries(value):
    """The `periodic` config value as a list of _Periodic entries; ConfigError names
    the entry and field at fault. Entries parsed before pass as they are. The job
    fields are checked when valet is built, against the registered tasks."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"periodic: {_show(value)} is not allowed; expected a list of "
                          f"entries, each with name, task_name and cron or every")
    entries = [entry if isinstance(entry, _Periodic) else _periodic_entry(entry, i)
               for i, entry in enumerate(value)]
    names = set()
    for i, entry in enumerate(entries):
        if entry["name"] in names:
            raise ConfigError(f"periodic[{i}].name: {entry['name']!r} is used by an earlier "
                              f"entry; names must be unique")
        names.add(entry["name"])
    return entries


def _periodic_entry(entry, i):
    """One entry of the `periodic` config value, checked and parsed."""
    where = f"periodic[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: {_show(entry)} is not allowed; expected a mapping "
                          f"with name, task_name and cron or every")
    unknown = [key for key in entry if key not in _PERIODIC_INPUT]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; an entry takes "
                          f"{', '.join(_PERIODIC_INPUT)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name: {_show(name)} is not allowed; expected a "
                          f"non-empty string")
    if ("cron" in entry) == ("every" in entry):
        raise ConfigError(f"{where}: give cron or every, not both" if "cron" in entry else
                          f"{where}: give cron or every: when its jobs are due")
    key = "cron" if "cron" in entry else "every"
    try:
        if key == "cron" and not isinstance(entry["cron"], str):
            raise ValueError(f"{_show(entry['cron'])} is not a cron expression such as "
                             f"\"*/5 * * * *\"")
        schedule = _Cron(entry["cron"]) if key == "cron" else _Every(entry["every"])
    except ValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None
    try:
        json.dumps(entry.get("metadata"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.metadata: it must be plain JSON (YAML dates, "
                          f".nan and .inf are not): {exc}") from None
    parsed = _Periodic(entry)
    parsed.schedule = schedule
    return parsed


# ------------------------------------------------------------------ metrics --

# (name, type, help) of every metric GET /metrics writes, in the order written.
# Counters and histograms are kept by _Metrics since the process started; the gauges
# are read when asked (Valet.metrics_text), from the store and the worker pool.
_METRICS = (
    ("valet_info", "gauge", "Always 1; the version is a label"),
    ("valet_process_start_time_seconds", "gauge", "When valet started (Unix time)"),
    ("valet_jobs", "gauge", "Jobs stored, by status"),
    ("valet_oldest_waiting_job_age_seconds", "gauge",
     "How long the job queued longest ago has waited for a worker (0 when none waits)"),
    ("valet_queue_depth", "gauge", "Jobs waiting for a worker, with the places held for "
                                   "submissions being stored"),
    ("valet_queue_capacity", "gauge", "The most jobs that may wait (queue_capacity)"),
    ("valet_workers", "gauge", "Workers in the pool (threads, or processes)"),
    ("valet_workers_busy", "gauge", "Workers running a job"),
    ("valet_workers_abandoned", "gauge", "Threads still running the task of a job that "
                                         "timed out or was cancelled"),
    ("valet_worker_processes_replaced_total", "counter",
     "Worker processes replaced: killed after a timeout or cancel, dead, or recycled"),
    ("valet_jobs_submitted_total", "counter", "Jobs created (by requests, pipelines and "
                                              "periodic entries), by task"),
    ("valet_jobs_finished_total", "counter", "Jobs that reached a final status, by task "
                                             "and outcome"),
    ("valet_job_retries_total", "counter", "Attempts scheduled again after a failure, "
                                           "and jobs retried by request, by task"),
    ("valet_job_run_seconds", "histogram", "How long each attempt ran, by task"),
    ("valet_job_wait_seconds", "histogram", "How long each attempt waited for a worker "
                                            "once it was ready to run, by task"),
    ("valet_http_requests_total", "counter", "HTTP requests answered, by method, route "
                                             "and status code"),
    ("valet_http_request_duration_seconds", "histogram", "Time to answer an HTTP "
                                                         "request, by method and route"),
    ("valet_storage_errors_total", "counter", "Storage calls that failed (a full disk, a "
                                              "read-only or corrupt file)"),
)
_OUTCOMES = ("completed", "failed", "timed_out", "cancelled")
_BUCKETS = {  # upper bounds, in seconds
    "valet_job_run_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                              30, 60, 300, 900, 3600),
    "valet_job_wait_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                               5, 10, 30, 60, 300, 900, 3600),
    "valet_http_request_duration_seconds": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                            0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
}


def _outcome(status, reason):
    """The outcome label of a job that reached a final status."""
    if status == FAILED and (reason or "").startswith(_TIMED_OUT):
        return "timed_out"
    return status.lower()


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name, labels, value):
    """One line of the text format: name{label="value",...} value."""
    if labels:
        name += "{" + ",".join(f'{key}="{_label_value(v)}"' for key, v in labels) + "}"
    if isinstance(value, float) and not value.is_integer():
        return f"{name} {value!r}"
    return f"{name} {int(value)}"


class _Metrics:
    """The counters and histograms of GET /metrics: kept in memory since valet
    started (they restart at zero with the process, as Prometheus expects). A
    sample's labels are a tuple of (name, value) pairs. Every method is
    thread-safe and cheap (one lock, a dict update, a bisect)."""

    def __init__(self, tasks=(), clock=time.time):
        self.started_at = clock()
        self._lock = threading.Lock()  # guards the two dicts below
        self._counters = {}    # (metric name, labels) -> count
        self._histograms = {}  # (metric name, labels) -> [count per bucket..., +Inf, sum]
        for task in tasks:     # so that a rate is known before the first job ends
            self.count("valet_jobs_submitted_total", (("task", task),), 0)
            for outcome in _OUTCOMES:
                self.count("valet_jobs_finished_total",
                           (("task", task), ("outcome", outcome)), 0)
            self.count("valet_job_retries_total", (("task", task),), 0)

    def count(self, name, labels, n=1):
        key = (name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def observe(self, name, labels, seconds):
        bounds = _BUCKETS[name]
        at = bisect.bisect_left(bounds, seconds)  # the first bound at or above it
        key = (name, labels)
        with self._lock:
            counts = self._histograms.get(key)
            if counts is None:
                counts = self._histograms[key] = [0] * (len(bounds) + 1) + [0.0]
            counts[at] += 1
            counts[-1] += seconds

    # What the lifecycle, the pool and the HTTP handler report.

    def finished(self, task, status, reason=None):
        self.count("valet_jobs_finished_total",
                   (("task", task), ("outcome", _outcome(status, reason))))

    def request(self, method, route, code, seconds):
        self.count("valet_http_requests_total",
                   (("method", method), ("route", route), ("code", str(code))))
        self.observe("valet_http_request_duration_seconds",
                     (("method", method), ("route", route)), seconds)

    def text(self, gauges):
        """The whole exposition (text format 0.0.4). `gauges` maps the name of each
        gauge (and of each counter kept elsewhere) to its value, or to a list of
        (labels, value)."""
        with self._lock:
            counters = sorted(self._counters.items())
            histograms = sorted((key, list(counts))
                                for key, counts in self._histograms.items())
        lines = []
        for name, kind, text in _METRICS:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in gauges:
                value = gauges[name]
                lines += ([_sample(name, labels, v) for labels, v in value]
                          if isinstance(value, list) else [_sample(name, (), value)])
            elif kind == "counter":
                lines += [_sample(name, labels, value)
                          for (metric, labels), value in counters if metric == name]
            else:
                for (metric, labels), counts in histograms:
                    if metric == name:
                        lines += _histogram_lines(name, labels, counts)
        return "\n".join(lines) + "\n"


def _histogram_lines(name, labels, counts):
    """A histogram's samples: its buckets, counted cumulatively, then sum and count."""
    lines, total = [], 0
    for bound, n in zip((*_BUCKETS[name], "+Inf"), counts):
        total += n
        le = bound if bound == "+Inf" else repr(float(bound))
        lines.append(_sample(f"{name}_bucket", (*labels, ("le", le)), total))
    return [*lines, _sample(f"{name}_sum", labels, counts[-1]),
            _sample(f"{name}_count", labels, total)]


# --------------------------------------------------------------------- HTTP --

class HTTPError(Exception):
    """An error answer: carried from wherever the HTTP layer finds it (or from a
    ValetError, by _http_error) to the one place that writes it."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": True, "code": self.status, "message": self.message}


# The status code of each of valet's errors. Any other exception is a 500.
_ERROR_STATUS = {Invalid: 400, NotFound: 404, Conflict: 409, BacklogFull: 503,
                 ShuttingDown: 503, StorageError: 503}
_ANSWERED = (HTTPError, *_ERROR_STATUS)


def _http_error(exc):
    """The HTTPError that answers one of _ERROR_STATUS's errors; a 503 says when to
    try again."""
    status = next(code for kind, code in _ERROR_STATUS.items() if isinstance(exc, kind))
    wait = "5" if isinstance(exc, StorageError) else "1"
    return HTTPError(status, str(exc), {"Retry-After": wait} if status == 503 else None)


def _encode(payload):
    return _ENCODER.encode(payload).encode()


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
    obj = _JsonObject(pairs)
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


_JSON = "application/json"
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")  # 2, 0.5: a plain, short decimal


class _Request:
    """What a route function sees of a request."""

    __slots__ = ("params", "args", "body", "prefix", "headers")

    def __init__(self, params, args, body, prefix, headers=None):
        self.params = params  # from the path: {"id": ...}
        self.args = args      # from the query string, as the route allows them
        self.body = body
        self.prefix = prefix  # "/api" when the request came in under it, else ""
        self.headers = headers or {}  # lower-case name -> its values

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
        # Deeper than any field may be (metadata in a pipeline's job sits 3 levels
        # down), and before anything recursive (an error message, say) walks it.
        # (Fewer brackets than the limit cannot nest deeper: most bodies skip the walk.)
        value.shallow = text.count("[") + text.count("{") <= _MAX_DEPTH
        if not value.shallow and _too_deep(value, _MAX_DEPTH + 4):
            deep = next(key for key, field in value.items()
                        if _too_deep(field, _MAX_DEPTH + 3))
            raise HTTPError(400, f"{_cut(deep, 40)} is nested too deeply: metadata may "
                                 f"nest {_MAX_DEPTH} levels, the other fields less")
        if "\\ud" in text.lower():  # a \uD800-\uDFFF escape must be half of a pair
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPError(400, "body is not valid JSON: it has a lone surrogate "
                                     "escape (\\uD800-\\uDFFF), which is not text") from None
        return value



def _found(value, what, item_id):
    """`value`, unless it is None: then the NotFound for that job or pipeline."""
    if value is None:
        raise _not_found(what, item_id)
    return value


def _listing(args):
    """A listing's query as the facade takes it."""
    return {"status": args.get("status"), "limit": args.get("limit", DEFAULT_PAGE_SIZE),
            "cursor": args.get("cursor")}


def _wait_seconds(text):
    """The seconds of ?wait=, or HTTPError(400)."""
    if not (_SECONDS.fullmatch(text) and float(text) <= MAX_WAIT):
        raise HTTPError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT}, "
                             f"written as digits such as 2 or 0.5, got {text!r}")
    return float(text)


# The routes: each calls one method of the app (a Valet) and turns its answer into
# (status, JSON body[, headers]).

def _idempotency_key(req):
    """The request's Idempotency-Key, or None; HTTPError(400) if it is given twice."""
    keys = req.headers.get("idempotency-key", ())
    if len(keys) > 1:
        raise HTTPError(400, "Idempotency-Key is given more than once")
    return keys[0] if keys else None


def _created(item, created, location):
    """202 for what a POST created; 200, with the same body, for what a repeat of it
    (the same Idempotency-Key and body) created before."""
    headers = {"Location": location}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return (202 if created else 200), item, headers


def _post_job(app, req):
    job, created = app.submit_once(req.json(), _idempotency_key(req))
    return _created(job, created, f"{req.prefix}/jobs/{job['id']}")


def _delete_jobs(app, req):
    return 200, app.delete_jobs(req.args.get("status"), req.args.get("finished_before"))


def _list_jobs(app, req):
    return 200, app.list_jobs(**_listing(req.args),
                              **{key: req.args.get(key) for key in _JOB_FILTERS},
                              order=req.args.get("order", "asc"))


def _get_job(app, req):
    job_id = req.params["id"]
    if "wait" in req.args:
        return 200, _found(app.wait(job_id, _wait_seconds(req.args["wait"])), "job", job_id)
    return 200, _found(app.job(job_id), "job", job_id)


def _patch_job(app, req):
    app.update_job(req.params["id"], req.json())
    return 204, None


def _delete_job(app, req):
    app.delete_job(req.params["id"])
    return 204, None


def _cancel_job(app, req):
    return 200, app.cancel(req.params["id"])


def _retry_job(app, req):
    return 200, app.retry(req.params["id"])


def _retry_jobs(app, req):
    return 200, app.retry_jobs(req.args.get("status"), req.args.get("task_name"))


def _get_result(app, req):
    return 200, app.result(req.params["id"], strict=True)


def _delete_result(app, req):
    app.delete_result(req.params["id"])
    return 204, None


def _post_pipeline(app, req):
    pipeline, created = app.submit_pipeline_once(req.json(), _idempotency_key(req))
    return _created(pipeline, created, f"{req.prefix}/pipelines/{pipeline['id']}")


def _list_pipelines(app, req):
    return 200, app.list_pipelines(**_listing(req.args))


def _get_pipeline(app, req):
    return 200, _found(app.pipeline(req.params["id"]), "pipeline", req.params["id"])


def _patch_pipeline(app, req):
    app.update_pipeline(req.params["id"], req.json())
    return 204, None


def _delete_pipeline(app, req):
    app.delete_pipeline(req.params["id"])
    return 204, None


def _pipeline_jobs(app, req):
    jobs = _found(app.pipeline_jobs(req.params["id"]), "pipeline", req.params["id"])
    return 200, {"jobs": jobs}


def _cancel_pipeline(app, req):
    return 200, app.cancel_pipeline(req.params["id"])


def _list_periodic(app, req):
    return 200, {"periodic": app.periodic()}


def _list_tasks(app, req):
    return 200, {"tasks": app.task_names()}


def _status(app, req):
    status = app.status()
    if status["storage"]["ok"]:
        return 200, status
    return 503, status, {"Retry-After": "5"}


def _metrics(app, req):
    return 200, app.metrics_text().encode(), {"Content-Type": _PROMETHEUS_TYPE}


def _openapi_json(app, req):
    return 200, app.openapi()


def _dashboard(app, req):
    return 200, _DASHBOARD, _DASHBOARD_HEADERS


_LISTING = ("status", "limit", "cursor")
_JOB_FILTERS = ("task_name", "name", "created_after", "created_before")

# (method, path, route function, the query parameters it takes)
ROUTES = [
    ("POST", "/jobs", _post_job, ()),
    ("GET", "/jobs", _list_jobs, (*_LISTING, *_JOB_FILTERS, "order")),
    ("DELETE", "/jobs", _delete_jobs, ("status", "finished_before")),
    ("GET", "/jobs/{id}", _get_job, ("wait",)),
    ("PATCH", "/jobs/{id}", _patch_job, ()),
    ("DELETE", "/jobs/{id}", _delete_job, ()),
    ("POST", "/jobs/{id}/cancel", _cancel_job, ()),
    ("POST", "/jobs/{id}/retry", _retry_job, ()),
    ("POST", "/jobs/retry", _retry_jobs, ("status", "task_name")),
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
    ("GET", "/metrics", _metrics, ()),
    ("GET", "/openapi.json", _openapi_json, ()),
    ("GET", "/", _dashboard, ()),  # the page asks for the token itself: it needs none
]

_COMPILED_ROUTES = [
    (method, re.compile(r"(?P<prefix>/api)?" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
                        + "/?"), fn, query, pattern)
    for method, pattern, fn, query in ROUTES
]


_DASHBOARD_PATH = next(regex for _, regex, fn, *_ in _COMPILED_ROUTES if fn is _dashboard)


def _match(method, path):
    """Return (route function, path parameters, allowed query parameters, the route's
    path pattern), or raise HTTPError 404 or 405. HEAD is answered as GET, without
    the body (for health checks that use it)."""
    allowed = []
    for route_method, regex, fn, query, pattern in _COMPILED_ROUTES:
        found = regex.fullmatch(path)
        if found:
            if route_method == method or (method, route_method) == ("HEAD", "GET"):
                return fn, found.groupdict(), query, pattern
            allowed += ["GET", "HEAD"] if route_method == "GET" else [route_method]
    if allowed:
        raise HTTPError(405, f"{method} is not allowed on {path}; allowed: "
                             f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)})
    raise HTTPError(404, f"no such path: {path}")


def _is_dashboard(path):
    """Whether a request's path is the dashboard's (which holds no data)."""
    return _DASHBOARD_PATH.fullmatch(path.partition("?")[0]) is not None


def _route_of(path):
    """The path pattern of a route that `path` matches (for metrics), or "other"."""
    return next((pattern for _, regex, _, _, pattern in _COMPILED_ROUTES
                 if regex.fullmatch(path)), "other")


def _parse_query(query, allowed):
    """The query parameters that have a value (an empty one counts as not given), or
    HTTPError(400) for one the route does not take or one given twice."""
    if not query:
        return {}
    args, unknown, repeated = {}, [], []
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            unknown.append(repr(name))
        elif name in args:
            repeated.append(f"query parameter {name!r} is given more than once")
        args[name] = value
    problems = repeated
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        problems = [f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(unknown)}; {takes}", *repeated]
    if problems:
        raise HTTPError(400, "; ".join(problems))
    return {name: value for name, value in args.items() if value}


def _cut(text, limit=200):
    """A path or id for a log line, cut short: a client may send 60 KB of it."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class _Tally:
    """Lines that can come thousands of times a second (503s from a full backlog or a
    failing store, refused connections): the first of each kind is logged in full,
    and the rest of that second as one line with their count. flush() is called
    by the HTTP server's loop, after each connection and at least once a second."""

    def __init__(self, monotonic=time.monotonic):
        self._monotonic = monotonic
        self._lock = threading.Lock()  # guards _counts and _since
        self._counts = {}  # kind -> how many came after the first was logged
        self._since = monotonic()

    def first(self, kind):
        """Count one line of this kind; True if it is the first this second (log it)."""
        with self._lock:
            if kind in self._counts:
                self._counts[kind] += 1
                return False
            self._counts[kind] = 0
            return True

    def flush(self):
        with self._lock:
            if self._monotonic() - self._since < 1:
                return
            counts, self._counts, self._since = self._counts, {}, self._monotonic()
        for kind, count in counts.items():
            if count:
                log.info("%d more like this in the last second: %s", count, kind)


def _host_name(host):
    """The name in a Host header, without its port, lower case: "[::1]:80" -> "[::1]";
    a bare IPv6 address (as server.host gives it) is bracketed as a Host has it."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    if host.count(":") > 1:
        return f"[{host}]"
    return host.rpartition(":")[0] if ":" in host else host


def _exposed(config):
    """Whether valet would listen beyond this machine with no token."""
    return config["server.auth_token"] is None and not _is_loopback(config["server.host"])


def _is_loopback(host):
    if host in ("localhost", "[::1]"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token


class _Reader(socket.SocketIO):
    """A connection's reading side, with two clocks: an idle keep-alive connection
    waits up to `idle` seconds for a request, and once a request's first byte has
    come, its head and body must all come within `whole` seconds (socket timeouts
    alone bound each read, so a byte every few seconds would hold a thread for
    ever). A read past either raises TimeoutError."""

    def __init__(self, sock, idle, whole):
        super().__init__(sock, "rb")
        self.idle, self.whole = idle, whole
        self.deadline = None  # monotonic, once a request has begun
        self.timeout = idle   # the socket's timeout, as last set
        sock.settimeout(idle)

    def rearm(self):
        """Wait for the next request (and write this one's answer) on the idle clock."""
        self.deadline = None
        if self.timeout != self.idle:
            self._set(self.idle)

    def _set(self, timeout):
        # Only when it changes: settimeout() lets go of the GIL, which costs a thread
        # switch under load. A request that comes in one read (most) sets none.
        self._sock.settimeout(timeout)
        self.timeout = timeout

    def readinto(self, buffer):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long to arrive")
            if left < self.timeout * 0.9:  # so a read overshoots by a tenth at most
                self._set(left)
        count = super().readinto(buffer)
        if self.deadline is None and count:
            self.deadline = time.monotonic() + self.whole
        return count


class _HeadLines:
    """What http.server reads a request's header lines from: the handler's reader,
    noting a line with a CR or NUL inside it. Python's parser splits a line at a
    bare CR where a proxy in front may not, so the two would disagree about the
    request's headers (its Content-Length, say): _check_framing refuses it."""

    def __init__(self, handler):
        self._handler = handler
        self._rfile = handler.rfile

    def readline(self, limit=-1):
        line = self._rfile.readline(limit)
        inside = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
        if b"\r" in inside or b"\0" in inside:
            self._handler._odd_head = True
        return line


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request, checks its head (framing, Host, origin, token, content type),
    finds its route, and writes what the route returns."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = f"valet/{__version__}"
    disable_nagle_algorithm = True

    def do_GET(self):
        self._dispatch()

    # Every method goes through the routes, so an unrouted one gets 405 with Allow.
    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def setup(self):
        super().setup()
        threading.current_thread().name = "valet-http-connection"
        config = self.server.app.config
        self.rfile.close()
        self._reader = _Reader(self.connection, config["server.keepalive_timeout"],
                               config["server.request_timeout"])
        self.rfile = io.BufferedReader(self._reader)
        self._cors = None  # the allowed cross origin of the request, if it has one
        self.fields = {}   # the request's headers, once _check_framing has read them

    def handle_one_request(self):
        """http.server's, but an empty line before the request line is skipped (RFC
        9112 allows it), and a request that does not arrive in time, or a client
        that goes away, closes the connection with a log line, not a traceback."""
        self._reader.rearm()
        self._cors = None
        self._odd_head = False
        self.command = self.path = ""  # (a refusal's log line names this request's)
        try:
            line = self.rfile.readline(65537)
            for _ in range(8):
                if line not in (b"\r\n", b"\n"):
                    break
                line = self.rfile.readline(65537)
            self.raw_requestline = line
            if len(line) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "the request line is longer than 65536 bytes")
                return
            if not line:
                self.close_connection = True
                return
            body, self.rfile = self.rfile, _HeadLines(self)  # (see _HeadLines)
            try:
                parsed = self.parse_request()
            finally:
                self.rfile = body
            if not parsed:
                return
            getattr(self, f"do_{self.command}", self._other_method)()
        except TimeoutError:
            self.close_connection = True
            kind = (f"closed a connection: its request did not arrive within "
                    f"{self._reader.whole:g}s (server.request_timeout)")
            if self._reader.deadline is not None and self.server.tally.first(kind):
                log.info("%s (from %s)", kind, self.client_address[0])
        except OSError as exc:  # the client went away: reset, broken pipe
            self.close_connection = True
            log.debug("connection from %s ended: %s", self.client_address[0], exc)

    def _method(self):
        """The request's method as a metric's label: any other than the usual ones is
        "other" (a client may send thousands of made-up ones)."""
        return self.command if self.command in _METHODS else "other"

    def _other_method(self):
        """Any other method (TRACE, QUERY, BREW) is routed too, to 404, or 405 with the
        Allow of its path: not 501, which would tell monitoring that valet failed.
        One that is not a token cannot be a method at all."""
        if not _HEADER_NAME.fullmatch(self.command):
            self.send_error(400, f"malformed method {_cut(self.command, 40)!r}")
            return
        self._dispatch()

    def _dispatch(self):
        started = time.perf_counter()
        app = self.server.app
        path, _, query = self.path.partition("?")
        why, body, route = "", None, None
        try:
            self._check_head()
            if self.command == "OPTIONS" and self._field("origin"):
                status, headers, data = self._preflight()
            else:
                body = self._read_body()
                if app.stopping:  # a keep-alive connection that outlived the listener
                    self.close_connection = True
                    raise _shutting_down()
                fn, params, allowed, route = _match(self.command, path)
                prefix = params.pop("prefix") or ""
                request = _Request(params, _parse_query(query, allowed), body, prefix,
                                   self.fields)
                status, payload, *rest = fn(app, request)
                headers = rest[0] if rest else {}
                data = (b"" if payload is None else payload if isinstance(payload, bytes)
                        else _encode(payload))
        except _ANSWERED as exc:
            error = exc if isinstance(exc, HTTPError) else _http_error(exc)
            status, headers, data = error.status, error.headers, _encode(error.body())
            why = f": {_cut(error.message)}"
        except Exception as exc:
            if isinstance(exc, OSError) and body is None:
                raise  # reading the request failed: handle_one_request closes it
            if app.stopping:  # the store closed under the request, most likely
                log.warning("%s %s: error while stopping", self.command, _cut(self.path),
                            exc_info=True)
                error = _http_error(_shutting_down())
                status, headers, data = error.status, error.headers, _encode(error.body())
            else:
                log.exception("%s %s: internal error", self.command, _cut(self.path))
                status, headers = 500, {}
                data = _encode(HTTPError(500, "internal server error").body())
        self._send(status, data, headers)
        elapsed = time.perf_counter() - started
        app.metrics.request(self._method(), route or _route_of(path), status, elapsed)
        level = logging.INFO if status >= 400 else logging.DEBUG
        if status == 503 and not self.server.tally.first(f"{status}{why}"):
            return
        if log.isEnabledFor(level):
            log.log(level, "%s %s %d %.2fms%s", self.command, _cut(self.path), status,
                    elapsed * 1000, why)

    def _check_head(self):
        """Refuse, before its body is read, a request whose framing is ambiguous or
        that may not come in (Host, Origin, token, content type). A refusal closes
        the connection: the unread body cannot be told from a next request."""
        try:
            self._check_framing()
            self._check_access()
        except HTTPError:
            self.close_connection = True
            raise

    def _check_framing(self):
        if self._odd_head:
            raise HTTPError(400, "a header line holds a bare CR or a NUL")
        # A line the header parser could not read ("Content-Length : 5") ends its
        # headers there, the rest kept aside as a payload: that must not be ignored.
        if any(isinstance(defect, email.errors.MissingHeaderBodySeparatorDefect)
               for defect in self.headers.defects):
            line = str(self.headers.get_payload() or "")
            name = re.split(r"[\s:]", line, maxsplit=1)[0]  # not its value: a token?
            raise HTTPError(400, f"malformed header line (starting {_cut(name, 40)!r})")
        self.fields = fields = {}  # lower-case name -> its values, read once
        for name, value in self.headers.raw_items():
            if not _HEADER_NAME.fullmatch(name):
                raise HTTPError(400, f"malformed header name {_cut(name, 40)!r}")
            if "\n" in value:  # obs-fold: RFC 9112 lets a server refuse it
                raise HTTPError(400, f"header {_cut(name, 40)!r} is folded over two lines")
            fields.setdefault(name.lower(), []).append(value)
        lengths = fields.get("content-length", ())
        if len(lengths) > 1:
            raise HTTPError(400, "Content-Length is given more than once")
        if "transfer-encoding" in fields:
            if lengths:
                raise HTTPError(400, "give Content-Length or Transfer-Encoding, not both")
            raise HTTPError(411, "send the body with a Content-Length; transfer encodings "
                                 "(chunked) are not supported")
        hosts = fields.get("host", ())
        if len(hosts) > 1:
            raise HTTPError(400, "Host is given more than once")
        if not hosts and self.request_version == "HTTP/1.1":
            raise HTTPError(400, "an HTTP/1.1 request must have a Host header")

    def _field(self, name):
        """The value of a header (its lower-case name) that may be given once, or None."""
        values = self.fields.get(name)
        return values[0] if values else None

    def _check_access(self):
        server = self.server
        host = self._field("host")
        if host is not None and not server.allows_host(_host_name(host)):
            raise HTTPError(403, f"Host {_cut(host, 80)!r} is not in server.allowed_hosts; "
                                 f"add it there if clients reach valet by that name")
        origin = self._field("origin") or None
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            if not server.allows_origin(origin):
                raise HTTPError(403, f"requests from origin {_cut(origin, 80)!r} are not "
                                     f"allowed (server.cors_origins)")
            self._cors = origin
        if self.command == "OPTIONS" and origin is not None:
            return  # a preflight: the browser sends no credentials with it
        if server.token is not None and not (self.command in ("GET", "HEAD") and
                                             _is_dashboard(self.path)):
            given = self._field("authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "replace"), server.token):
                raise HTTPError(401, f"a valid token is required: send the header "
                                     f"Authorization: Bearer <the token> (valet takes "
                                     f"it from {server.token_from})",
                                {"WWW-Authenticate": 'Bearer realm="valet"'
                                 + (', error="invalid_token"' if given else "")})
        kind = self._field("content-type")
        if self._content_length() and not _is_json_type(kind):
            raise HTTPError(415, f"a body must be sent as Content-Type: application/json, "
                                 f"not {_cut(kind or 'none', 80)} "
                                 f"(with curl: --json '{{...}}')")

    def _preflight(self):
        """Answer a CORS preflight from an allowed origin."""
        self._read_body()
        if self._cors is None:
            raise HTTPError(403, "this is a same-origin request; it needs no preflight")
        return 204, {"Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE",
                     "Access-Control-Allow-Headers":
                         "Authorization, Content-Type, Idempotency-Key",
                     "Access-Control-Max-Age": "600"}, b""

    def _content_length(self):
        """The declared body length, or HTTPError (closing the connection, whose
        framing can no longer be trusted) if it is not a number or too large."""
        length = (self._field("content-length") or "0").strip() or "0"
        if not _DIGITS.fullmatch(length):
            self.close_connection = True
            raise HTTPError(400, f"Content-Length must be a whole number, got "
                                 f"{_cut(length, 40)!r}")
        length, limit = int(length), self.server.app.config["server.max_body_bytes"]
        if length > limit:
            self.close_connection = True
            raise HTTPError(413, f"body is {length} bytes; the limit is {limit} "
                                 f"(server.max_body_bytes)")
        return length

    def handle_expect_100(self):
        """Refuse a bad body before the client sends it, rather than after."""
        try:
            self._check_head()
        except HTTPError as exc:
            self._send(exc.status, _encode(exc.body()), exc.headers)
            self.server.app.metrics.request(self._method(), _route_of(
                self.path.partition("?")[0]), exc.status, 0.0)
            log.info("%s %s %d (before the body): %s", self.command, _cut(self.path),
                     exc.status, _cut(exc.message))
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
            lines += [f"Content-Type: {headers.get('Content-Type', 'application/json')}",
                      f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()
                  if name != "Content-Type"]
        if self._cors is not None:
            lines += [f"Access-Control-Allow-Origin: {self._cors}", "Vary: Origin",
                      "Access-Control-Expose-Headers: Location, Retry-After, "
                      "Idempotent-Replayed"]
        if self.close_connection:
            lines.append("Connection: close")
        if self.command == "HEAD":
            data = b""
        self._reader.rearm()  # a client that will not read: as long as an idle one
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)

    _last_date = (0, "")  # (epoch second, its Date header), shared by every connection

    def _date(self):
        """The Date header, formatted once a second rather than once a response."""
        second = int(time.time())
        if _Handler._last_date[0] != second:
            _Handler._last_date = (second, self.date_time_string(second))
        return _Handler._last_date[1]

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, too many headers), as JSON."""
        self.close_connection = True
        message = message or self.responses.get(code, ("error",))[0]
        self._cors = None
        self._send(code, _encode(HTTPError(code, message).body()), {})
        self.server.app.metrics.request(self._method(), "other", code, 0.0)
        log.info("%s %s %d (%s)", _cut(getattr(self, "command", "") or ""),
                 _cut(getattr(self, "path", "")), code, _cut(message))

    def log_message(self, format, *args):
        log.debug(format, *(_cut(str(arg)) for arg in args))


def _is_json_type(value):
    """Whether a Content-Type is application/json (in UTF-8, if it names a charset)."""
    kind, *params = (value or "").lower().split(";")
    if kind.strip() != "application/json":
        return False
    charset = [p.partition("=")[2].strip().strip('"') for p in params
               if p.strip().startswith("charset=")]
    return all(c in ("utf-8", "utf8") for c in charset)


def _whole_response(status, message, headers):
    """The bytes of a JSON error response, for a socket with no handler."""
    body = _encode(HTTPError(status, message).body())
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# The whole answer to a connection past server.max_connections.
_TOO_MANY = _whole_response(503, "too many connections (server.max_connections); try "
                                 "again shortly", {"Retry-After": "1"})


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog, a cap on connections (past it, a
    quick 503 from the listening thread), and errors logged, not printed."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive connections

    def __init__(self, address, app):
        self.app = app
        config = app.config
        self.request_queue_size = config["server.backlog"]  # listen()'s backlog
        self.max_connections = config["server.max_connections"]
        self.token = (None if config["server.auth_token"] is None
                      else config["server.auth_token"].encode())
        self.token_from = config.token_from
        hosts = config["server.allowed_hosts"]
        if hosts is None:  # the default: this machine's names, or any host with a token
            hosts = None if self.token is not None else [
                "localhost", "127.0.0.1", "[::1]", _host_name(config["server.host"])]
        self.hosts = None if hosts is None or "*" in hosts else {_host_name(h)
                                                                for h in hosts}
        origins = config["server.cors_origins"]
        self.origins = {"*"} if "*" in origins else {o.strip().rstrip("/") for o in origins}
        self.tally = _Tally()
        self._waker, self._wake = socket.socketpair()  # stop_serving() wakes serve()
        self._stopping, self._served = threading.Event(), threading.Event()
        self._serving = False  # serve() has begun
        self._lock = threading.Lock()  # guards _connections
        self._connections = 0
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def allows_host(self, name):
        return self.hosts is None or name in self.hosts

    def allows_origin(self, origin):
        return "*" in self.origins or origin.rstrip("/") in self.origins

    def process_request(self, request, client_address):
        with self._lock:
            full = self._connections >= self.max_connections
            self._connections += not full
        if full:
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self):
        with self._lock:
            self._connections -= 1

    def _refuse(self, request, client_address):
        """Answer 503 and close, without a thread and without waiting on the client."""
        request.setblocking(False)
        with contextlib.suppress(OSError):
            request.recv(65536)  # what it sent, so that closing does not reset
        with contextlib.suppress(OSError):
            request.send(_TOO_MANY)
        self.shutdown_request(request)
        kind = (f"refused a connection: server.max_connections ({self.max_connections}) "
                f"are open")
        if self.tally.first(kind):
            log.warning("%s (from %s)", kind, client_address[0])

    def serve(self):
        """Accept connections until stop_serving(). socketserver's serve_forever would
        notice a shutdown only at its next poll; this loop is woken at once."""
        self._serving = True
        self.socket.setblocking(False)  # a connection gone before accept() is skipped
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._waker, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(1):
                    if key.fileobj is self and not self._stopping.is_set():
                        self._handle_request_noblock()  # as serve_forever does
                self.tally.flush()
        self._served.set()

    def stop_serving(self):
        """Stop serve() and wait until it has returned (at once, if it never ran)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake.send(b"\0")
        if self._serving:
            self._served.wait(10)

    def server_close(self):
        super().server_close()
        self._waker.close()
        self._wake.close()

    def handle_error(self, request, client_address):
        """A connection's unexpected error, logged (socketserver would print it)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %s", client_address[0], exc)
        else:
            log.error("connection from %s: unexpected error", client_address[0],
                      exc_info=True)


# The API's description, GET /openapi.json (OpenAPI 3.1): built from ROUTES, each
# route's entry in _OPERATIONS, and the schemas below, which follow the checks the
# routes make. (The tests check every answer of the suite against it.)

def _nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


def _statuses(*statuses):
    """The schema of a status, one of these (valet also takes `failed` in a query)."""
    return {"type": "string", "enum": list(statuses)}


_STRING, _ANY = {"type": "string"}, {}
_TIME = {"type": "string", "format": "date-time"}
_NAME = {"type": "string", "pattern": r"\S"}  # not empty, not only spaces
_COUNT = {"type": "integer", "minimum": 0}
_TIME_OR_NULL, _TEXT_OR_NULL = _nullable(_TIME), _nullable(_STRING)
_PRIORITY = _nullable({"type": "integer", "minimum": -_MAX_PRIORITY,
                       "maximum": _MAX_PRIORITY})
_MILLISECONDS = {**_nullable({"type": "number", "minimum": 0}),
                 "description": "milliseconds from the first start to the end"}
_REF = {name: {"$ref": f"#/components/schemas/{name}"} for name in ("Job", "Pipeline")}


def _object(properties, required=()):
    """The schema of a JSON object with these properties and no others."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def _job_input(task_names, timeout_unit, pipeline_job=False):
    """The schema of a job in a POST /jobs body (or a job of a POST /pipelines body)."""
    number = {"type": "number"}
    longest = _MAX_TIMEOUT_SECONDS * (1000 if timeout_unit == "millisecond" else 1)
    fields = {
        "name": _NAME, "description": _nullable(_STRING),
        "task_name": {"type": "string", "enum": task_names},
        "metadata": _ANY, "task_params": {"deprecated": True,
                                          "description": "metadata's old name"},
        "timeout": _nullable({**number, "exclusiveMinimum": 0, "maximum": longest,
                              "description": f"in {timeout_unit}s"}),
        "priority": _PRIORITY,
        "run_at": _nullable(_TIME),
        "max_retries": _nullable({"type": "integer", "minimum": 0, "maximum": _MAX_RETRIES}),
        "retry_backoff": _nullable({**number, "minimum": 0, "maximum": _MAX_BACKOFF}),
        "use_previous_results": {"type": "boolean"},
    }
    allowed = _PIPELINE_JOB_INPUT if pipeline_job else _JOB_INPUT
    return {**_object({key: fields[key] for key in allowed}, ("name", "task_name")),
            "not": {"required": ["metadata", "task_params"]}}  # one or the other


def _answer_schemas():
    """The schemas of a job's and a pipeline's JSON, and of /status."""
    job = _object({
        "id": _STRING, "name": _STRING, "description": _TEXT_OR_NULL, "task_name": _STRING,
        "metadata": _ANY, "timeout": _nullable({"type": "number"}),
        "priority": {"type": "integer"}, "status": _statuses(*STATUSES),
        "failure_reason": _TEXT_OR_NULL, "failure_traceback": _TEXT_OR_NULL,
        "progress": _nullable(_object({"fraction": {"type": "number", "minimum": 0,
                                                    "maximum": 1},
                                       "message": _STRING}, ("fraction", "message"))),
        "attempts": _COUNT, "max_retries": _COUNT, "retry_backoff": {"type": "number"},
        "run_at": _TIME_OR_NULL, "created_at": _TIME, "started_at": _TIME_OR_NULL,
        "completed_at": _TIME_OR_NULL, "duration": _MILLISECONDS,
        "pipeline_id": _TEXT_OR_NULL, "next_job_id": _TEXT_OR_NULL,
        "use_previous_results": {"type": "boolean"}}, JOB_FIELDS)
    pipeline = _object({
        "id": _STRING, "name": _STRING, "description": _TEXT_OR_NULL,
        "priority": {"type": "integer"}, "status": _statuses(*STATUSES),
        "run_at": _TIME_OR_NULL, "created_at": _TIME, "started_at": _TIME_OR_NULL,
        "completed_at": _TIME_OR_NULL, "duration": _MILLISECONDS,
        "jobs": {"type": "array", "items": _REF["Job"]}}, PIPELINE_FIELDS)
    count = _object({status: _COUNT for status in STATUSES}, STATUSES)
    node = _object(dict(zip(_NODE_FIELDS, (_STRING, {"type": "boolean"}, _STRING, _COUNT,
                                           _STRING, _TIME, {"type": "number"}))), _NODE_FIELDS)
    status = _object({
        "version": _STRING, "time": _TIME, "uptime": {"type": "number", "minimum": 0},
        "storage": _object({"option": _STRING, "ok": {"type": "boolean"},
                            "error": _TEXT_OR_NULL}, ("option", "ok", "error")),
        "jobs": _nullable(count),
        "queue": _object({"depth": _COUNT, "capacity": _COUNT,
                          "accepting": {"type": "boolean"},
                          "oldest_waiting_seconds": _nullable({"type": "number",
                                                               "minimum": 0})},
                         ("depth", "capacity", "accepting", "oldest_waiting_seconds")),
        "workers": _object({"type": {"type": "string", "enum": ["thread", "process"]},
                            "busy": _COUNT,
                            "total": _COUNT, "abandoned": _COUNT,
                            "pids": {"type": "array", "items": _COUNT,
                                     "description": "the worker processes (process mode)"},
                            "replaced": {**_COUNT, "description": "worker processes "
                                         "replaced since start: killed, died or recycled "
                                         "(process mode)"}},
                           ("type", "busy", "total", "abandoned")),
        "nodes": _nullable({"type": "array", "items": node, "description": "the live "
                            "nodes sharing the store, with storage.option: postgres "
                            "(null while it fails)"})},
        ("version", "time", "uptime", "storage", "jobs", "queue", "workers"))
    return {"Job": job, "Pipeline": pipeline, "Status": status}


def _schemas(task_names, timeout_unit):
    cursor = _nullable({"type": "string", "pattern": "^[0-9]+$"})
    return {
        **_answer_schemas(),
        "Error": _object({"error": {"const": True}, "code": {"type": "integer"},
                          "message": _STRING}, ("error", "code", "message")),
        "NewJob": _job_input(task_names, timeout_unit),
        "NewPipeline": _object({
            "name": _NAME, "description": _TEXT_OR_NULL,
            "priority": _PRIORITY,
            "run_at": _TIME_OR_NULL,
            "jobs": {"type": "array", "minItems": 2, "maxItems": _MAX_PIPELINE_JOBS,
                     "items": _job_input(task_names, timeout_unit, pipeline_job=True)}},
            ("name", "jobs")),
        "Changes": _object({"name": _NAME, "description": _TEXT_OR_NULL}),
        "JobPage": _object({"jobs": {"type": "array", "items": _REF["Job"]},
                            "next_cursor": cursor}, ("jobs", "next_cursor")),
        "PipelinePage": _object({"pipelines": {"type": "array", "items": _REF["Pipeline"]},
                                 "next_cursor": cursor}, ("pipelines", "next_cursor")),
        "Jobs": _object({"jobs": {"type": "array", "items": _REF["Job"]}}, ("jobs",)),
        "Result": _object({"job_id": _STRING, "metadata": _ANY, "error": _TEXT_OR_NULL},
                          ("job_id", "metadata", "error")),
        "Deleted": _object({"deleted": _COUNT}, ("deleted",)),
        "Retried": _object({"retried": _COUNT, "more": {"type": "boolean"}},
                           ("retried", "more")),
        "Periodic": _object({"periodic": {"type": "array", "items": _object({
            "name": _STRING, "task_name": _STRING, "cron": _TEXT_OR_NULL,
            "every": {"anyOf": [{"type": "number"}, _STRING, {"type": "null"}],
                      "description": "as in the config: seconds, or a duration such as 5m"},
            "next_run_at": _TIME_OR_NULL,
            "last_fired_at": _TIME_OR_NULL}, ("name", "task_name", "cron", "every",
                                            "next_run_at", "last_fired_at"))}},
            ("periodic",)),
        "Tasks": _object({"tasks": {"type": "array", "items": _STRING}}, ("tasks",)),
    }


# The query parameters of ROUTES: name -> (schema, description).
_PARAMETERS = {
    "status": (_statuses(*STATUSES), "Only those in this status (in any case)"),
    "limit": ({"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
              f"Page size (default {DEFAULT_PAGE_SIZE})"),
    "cursor": ({"type": "string", "pattern": "^[0-9]*$"},
               "The next_cursor of the previous page"),
    "task_name": (_STRING, "Only jobs of this task"),
    "name": (_STRING, "Only jobs with this name"),
    "created_after": (_TIME, "Only jobs created after this time (RFC 3339)"),
    "created_before": (_TIME, "Only jobs created before this time (RFC 3339)"),
    "order": ({"type": "string", "enum": ["asc", "desc"]},
              "asc (oldest first, the default) or desc (newest first), in any case"),
    "finished_before": (_TIME, "Only jobs that finished before this time (RFC 3339)"),
    "wait": ({"type": "string", "pattern": r"^[0-9]{1,6}(\.[0-9]{1,6})?$"},
             f"Wait up to this many seconds (0 to {MAX_WAIT}) for the job to finish"),
}


# Where a route takes fewer statuses: (method, path) -> the status parameter.
_STATUS_PARAMETER = {
    ("DELETE", "/jobs"): (_statuses(*FINISHED), "Only finished jobs in this status (in "
                                                "any case)"),
    ("POST", "/jobs/retry"): (_statuses(FAILED, CANCELLED), "The jobs to retry: those "
                                                            "in this status (in any case)"),
}

# (method, path) -> (operationId, summary, request body schema or None, {success
# code: response schema, or None for no body}, the codes of the errors it may answer
# besides those of every route).
_OPERATIONS = {
    ("POST", "/jobs"): ("submitJob", "Submit a job", "NewJob", {202: "Job", 200: "Job"},
                        (409,)),
    ("GET", "/jobs"): ("listJobs", "List jobs, a page at a time", None, {200: "JobPage"},
                       ()),
    ("DELETE", "/jobs"): ("deleteFinishedJobs", "Delete finished jobs in bulk", None,
                          {200: "Deleted"}, ()),
    ("GET", "/jobs/{id}"): ("getJob", "One job (with wait: once it finishes)", None,
                            {200: "Job"}, (404,)),
    ("PATCH", "/jobs/{id}"): ("updateJob", "Rename or describe a job", "Changes",
                              {204: None}, (404,)),
    ("DELETE", "/jobs/{id}"): ("deleteJob", "Delete a job that is not running", None,
                               {204: None}, (404, 409)),
    ("POST", "/jobs/{id}/cancel"): ("cancelJob", "Cancel a job", None, {200: "Job"},
                                    (404, 409)),
    ("POST", "/jobs/{id}/retry"): ("retryJob", "Run a failed or cancelled job again", None,
                                   {200: "Job"}, (404, 409)),
    ("POST", "/jobs/retry"): ("retryJobs", "Retry failed or cancelled jobs in bulk", None,
                              {200: "Retried"}, ()),
    ("GET", "/jobs/{id}/results"): ("getResult", "A finished job's result", None,
                                    {200: "Result"}, (404,)),
    ("DELETE", "/jobs/{id}/results"): ("deleteResult", "Delete a job's result", None,
                                       {204: None}, (404,)),
    ("POST", "/pipelines"): ("submitPipeline", "Submit a pipeline", "NewPipeline",
                             {202: "Pipeline", 200: "Pipeline"}, (409,)),
    ("GET", "/pipelines"): ("listPipelines", "List pipelines, a page at a time", None,
                            {200: "PipelinePage"}, ()),
    ("GET", "/pipelines/{id}"): ("getPipeline", "One pipeline with its jobs", None,
                                 {200: "Pipeline"}, (404,)),
    ("PATCH", "/pipelines/{id}"): ("updatePipeline", "Rename or describe a pipeline",
                                   "Changes", {204: None}, (404,)),
    ("DELETE", "/pipelines/{id}"): ("deletePipeline", "Delete a pipeline that is not "
                                    "running", None, {204: None}, (404, 409)),
    ("GET", "/pipelines/{id}/jobs"): ("listPipelineJobs", "A pipeline's jobs", None,
                                      {200: "Jobs"}, (404,)),
    ("POST", "/pipelines/{id}/cancel"): ("cancelPipeline", "Cancel what is left of a "
                                         "pipeline", None, {200: "Pipeline"}, (404, 409)),
    ("GET", "/periodic"): ("listPeriodic", "The periodic entries", None,
                           {200: "Periodic"}, ()),
    ("GET", "/tasks"): ("listTasks", "The registered task names", None, {200: "Tasks"},
                        ()),
    ("GET", "/status"): ("getStatus", "Health and load (503 while the storage fails)",
                         None, {200: "Status"}, ()),
    ("GET", "/metrics"): ("getMetrics", "Metrics in the Prometheus text format", None,
                          {200: "text"}, ()),
    ("GET", "/openapi.json"): ("getOpenapi", "This document", None, {200: "any"}, ()),
    ("GET", "/"): ("dashboard", "The dashboard (HTML)", None, {200: "html"}, ()),
}
# Errors any route may answer (see the README's Errors).
_EVERY_ROUTE_ERRORS = (400, 403, 411, 413, 415, 431, 503)


def _response(code, schema):
    """The OpenAPI response object for a code and a schema name (or a kind of text)."""
    phrase = http.HTTPStatus(code).phrase
    if schema is None:
        return {"description": phrase}
    kinds = {"text": (_PROMETHEUS_TYPE.split(";")[0], _STRING),
             "html": ("text/html", _STRING), "any": (_JSON, {"type": "object"})}
    kind, body = kinds.get(schema, (_JSON, {"$ref": f"#/components/schemas/{schema}"}))
    return {"description": phrase, "content": {kind: {"schema": body}}}


def _operation(method, pattern, query, token):
    operation_id, summary, body, answers, errors = _OPERATIONS[(method, pattern)]
    public = pattern == "/"  # the dashboard, which needs no token
    codes = sorted({*errors, *_EVERY_ROUTE_ERRORS, *((401,) if token and not public else ())})
    parameters = [{"name": "id", "in": "path", "required": True, "schema": _STRING}
                  if "{id}" in pattern else None]
    described = {**_PARAMETERS, "status": _STATUS_PARAMETER.get((method, pattern),
                                                                _PARAMETERS["status"])}
    parameters += [{"name": name, "in": "query", "required": name == "status" and
                    pattern == "/jobs/retry", "schema": described[name][0],
                    "description": described[name][1]} for name in query]
    if method == "POST" and body is not None:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}})
    operation = {
        "summary": summary, "operationId": operation_id,
        "tags": [pattern.split("/")[1] if pattern.startswith(("/jobs", "/pipelines"))
                 else "server"],
        "parameters": [p for p in parameters if p is not None],
        "responses": {**{str(code): _response(code, schema)
                         for code, schema in answers.items()},
                      **{str(code): {"$ref": f"#/components/responses/{code}"}
                         for code in codes}}}
    if pattern == "/status":  # (while valet stops: an Error, as on every route)
        operation["responses"]["503"] = {"description": "Service Unavailable", "content": {
            _JSON: {"schema": {"anyOf": [{"$ref": "#/components/schemas/Status"},
                                         {"$ref": "#/components/schemas/Error"}]}}}}
    if public and token:
        operation["security"] = []
    if method == "POST" and pattern in ("/jobs", "/pipelines"):
        links = {_OPERATIONS[(m, p)][0]: {"operationId": _OPERATIONS[(m, p)][0],
                                          "parameters": {"id": "$response.body#/id"}}
                 for m, p, *_ in ROUTES if p.startswith(pattern + "/{id}")}
        for code in answers:
            operation["responses"][str(code)]["links"] = links
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {
            _JSON: {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return operation


def _openapi(task_names, token, timeout_unit="second"):
    """The OpenAPI 3.1 document of the API, for these tasks and timeout_unit, with
    the bearer token scheme if `token` (whether a token is required)."""
    paths = {}
    for method, pattern, _, query in ROUTES:
        paths.setdefault(pattern, {})[method.lower()] = _operation(method, pattern, query,
                                                                   token)
    errors = (*_EVERY_ROUTE_ERRORS, 401, 404, 409)
    document = {
        "openapi": "3.1.0",
        "info": {"title": "valet", "version": __version__,
                 "description": "An asynchronous job server. Every path also answers "
                                "under /api."},
        "paths": paths,
        "components": {
            "schemas": _schemas(task_names, timeout_unit),
            "responses": {str(code): _response(code, "Error") for code in sorted(errors)}},
    }
    if token:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document

# ------------------------------------------------------------------- facade --

class Valet:
    """The whole server: store, lifecycle, worker pool, scheduler and HTTP API, built
    from a config and tasks. Each endpoint of the HTTP API has a method here that
    does the same for an embedding program, with the same checks and messages:
    they raise ValetError's subclasses where the API answers 4xx or 503.

    `config` is what load_config() takes (None, a YAML path or a dict) or its
    result; `tasks` maps task names to functions, and defaults to the TASKS dict
    of the module named by `tasks_module`; `clock` is the wall clock (epoch
    seconds) that run_at times and periodic due times follow, and `monotonic` the
    clock timeouts are measured on (tests pass their own); `store` is a Store to
    use instead of the one the config names. Constructing opens the store (and so
    may raise sqlite3.Error or ConfigError) but starts nothing else. Every method
    is thread-safe. Once stop() has begun, a method that would change a job raises
    ShuttingDown; one that reads works until stop() has closed the store.
    """

    def __init__(self, config=None, tasks: dict | None = None, clock=time.time,
                 monotonic=time.monotonic, store: Store | None = None):
        self.config = load_config(config)  # validates; a loaded config passes unchanged
        self.tasks = dict(tasks if tasks is not None else _load_tasks(self.config))
        for i, entry in enumerate(self.config["periodic"]):
            try:
                _new_job(entry.job_fields(), self.tasks, self.config["timeout_unit"], 0,
                         where=f"periodic[{i}]: ")
            except Invalid as exc:
                raise ConfigError(str(exc)) from None
        self.clock = clock
        self._monotonic = monotonic
        self.scheduler = _Scheduler(clock, self.config["periodic"])
        self.metrics = _Metrics(self.tasks, clock)  # the counters of GET /metrics
        self.lifecycle = _Lifecycle(store if store is not None else _open_store(self.config),
                                    self.scheduler, clock, self.metrics)
        processes = None if self.config["worker_pool.worker_type"] == "thread" else {
            "kill_grace": self.config["worker_pool.kill_grace"],
            "max_jobs": self.config["worker_pool.max_jobs_per_child"],
            "max_memory": self.config["worker_pool.max_memory_per_child"]}
        self.pool = _WorkerPool(self.lifecycle, self.tasks, self.config["worker_pool.workers"],
                                self.config["worker_pool.queue_capacity"],
                                self.config["timeout_unit"], clock, monotonic,
                                self.config["worker_pool.default_timeout"], processes)
        self.lifecycle.pool = self.pool
        self.node = None  # this process as a node of several (a store they share)
        if getattr(self._store, "shared", False):
            self.node = _Node(self.config["storage.postgres.node"], self._store,
                              self.lifecycle, self.pool,
                              self.config["storage.postgres.heartbeat"],
                              self.config["storage.postgres.node_timeout"],
                              self.config["storage.postgres.poll"],
                              self.config["storage.postgres.listen"], clock)
        keep = self.config["retention.finished_jobs"]
        self.retention = None if keep is None else _duration_seconds(keep)  # seconds
        self.started_at = None  # monotonic, once started
        self.stopping = False   # set first thing in stop(): requests then get 503
        self._halted = threading.Event()  # set by stop(): the retention thread ends
        self._closed = False    # set once stop() closes the store
        self._recovered = False
        self._server = None
        self._openapi = None  # the API's description, made when first asked for
        self._state = threading.Lock()  # guards started_at and stopping

    @property
    def port(self) -> int:
        """The port the HTTP server listens on (useful after asking for port 0)."""
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def _store(self):
        return self.lifecycle.store

    # -- starting and stopping

    def recover(self):
        """Take up what a previous run left in the store (see _Lifecycle.recover), and
        plan each periodic entry's next firing (at once, if it missed a due time
        while valet was down).

        Called by start(), unless it was called before; safe to call on its own (for
        tests and tools) before start().
        """
        if self._recovered:
            return
        if self.node is not None:
            if self.node.name is None:  # a node is named after where it listens
                port = self.port if self._server is not None else self.config["server.port"]
                self.node.name = f"{socket.gethostname()}:{port}"
            self.node.join()
        self.lifecycle.recover()
        self._recovered = True
        self.scheduler.start_periodic(self._store.periodic_last, self._fire)

    def _fire(self, entry, due):
        """Create the periodic entry's job for one due time; the store records the
        firing with the job, so that it happens once, even across restarts."""
        job = _new_job(entry.job_fields(), self.tasks, self.config["timeout_unit"],
                       self.clock())
        if self.lifecycle.persist(self.lifecycle.accept, job, fired=(entry["name"], due)):
            log.info("job %s: created %s by periodic entry %r (due %s)", job["id"], PENDING,
                     entry["name"], _rfc3339(due))

    def start(self) -> "Valet":
        """Recover, listen, and start the workers and the scheduler. Raises OSError if
        it cannot listen, and RuntimeError if it was started or stopped before: a
        stopped Valet has closed its store; build a new one to run again."""
        with self._state:
            if self.stopping:
                raise RuntimeError("valet was stopped and cannot be started again; "
                                   "build a new Valet")
            if self.started_at is not None:
                raise RuntimeError("valet is already started")
            self._server = _Server((self.config["server.host"], self.config["server.port"]),
                                   self)
            try:
                self.recover()
            except BaseException:
                self._server.server_close()
                raise
            self.pool.start()
            if self.node is not None:
                self.node.start()
            self.scheduler.start()
            if self.retention is not None:
                threading.Thread(target=self._sweep_forever, name="valet-retention",
                                 daemon=True).start()
            threading.Thread(target=self._server.serve, name="valet-http",
                             daemon=True).start()
            self.started_at = self._monotonic()
        where = getattr(self._store, "path", None)
        kind = self.config["worker_pool.worker_type"]  # thread or process
        if self.pool.size > 1:
            kind += "es" if kind.endswith("s") else "s"
        if self.node is not None:
            where = f"{self._store.where}, node {self.node.name}"
        log.info("valet %s listening on %s (storage: %s%s, workers: %d %s%s)",
                 __version__, self.url, self._store.option, f" {where}" if where else "",
                 self.pool.size, kind,
                 f", token required, from {self.config.token_from}"
                 if self._server.token is not None else "")
        if _exposed(self.config):
            log.warning("listening on %s with no server.auth_token: anyone who can reach "
                        "this port can submit, read and delete jobs; set one (or "
                        "VALET_AUTH_TOKEN), or listen on 127.0.0.1",
                        self.config["server.host"])
        return self

    def stop(self, grace: float | None = None):
        """Stop accepting requests, let running jobs finish for up to `grace` seconds
        (default worker_pool.shutdown_grace), and close the store. Blocks; idempotent.
        Scheduled and pending jobs stay in the store for the next start."""
        with self._state:
            if self.stopping:
                return
            self.stopping = True
        if grace is None:
            grace = self.config["worker_pool.shutdown_grace"]
        self._halted.set()
        self.lifecycle.halt()
        self.pool.halt()
        self.lifecycle.wake_all()  # every wait() answers now, before the store closes
        self.scheduler.stop()
        if self.started_at is not None:
            log.info("stopping: no new job starts; running jobs get up to %gs", grace)
        if self._server is not None:
            self._server.stop_serving()
            self._server.server_close()
        if self.node is not None:
            self.node.stop()
        if self.started_at is not None:
            self.pool.stop(grace)
        if self.node is not None:
            self.node.leave()  # (if it joined)
        self._closed = True
        self._store.close()
        if self.started_at is not None:
            log.info("valet stopped")

    def _refuse_when_stopping(self):
        """What changes jobs is refused once stop() has begun."""
        if self.stopping:
            raise _shutting_down()

    def _refuse_when_closed(self):
        """What reads them works until stop() has closed the store."""
        if self._closed:
            raise _shutting_down()

    def sweep(self) -> int:
        """Delete one batch of the jobs and pipelines that finished more than
        retention.finished_jobs ago, with their results and idempotency keys;
        return how many jobs it deleted. start() runs it on the scheduler's
        thread, valet-retention: once a minute, and again at once after a full batch
        (a thread of its own, so that a long clean-up never delays a due job)."""
        if self.retention is None:
            return 0
        return self._store.purge(self.clock() - self.retention, FINISHED, _PURGE_BATCH,
                                 pipelines=True)

    def _sweep_forever(self):
        deleted = 0
        while not self._halted.wait(0 if deleted >= _PURGE_BATCH else _SWEEP_EVERY):
            try:
                deleted = self.sweep()
            except (StorageError, RuntimeError):  # the store logs its fault; or it closed
                deleted = 0
            if deleted:
                log.info("retention: deleted %d job(s) that finished more than %s ago",
                         deleted, self.config["retention.finished_jobs"])

    # -- jobs

    def submit(self, fields: dict, idempotency_key: str | None = None) -> dict:
        """Store a job (the fields of a POST /jobs body) and queue or schedule it;
        return its JSON. Blocks until the job is stored (committed, on SQLite).
        Raises Invalid naming every field that is wrong, BacklogFull, StorageError
        or ShuttingDown; in any case nothing is stored. With an idempotency_key,
        as submit_once()."""
        return self.submit_once(fields, idempotency_key)[0]

    def submit_once(self, fields: dict, key: str | None) -> tuple:
        """submit() a job once per idempotency key (if not None): (its JSON, True)
        when this call created it; (the JSON of the job the key created before,
        False) when the same fields came with the key before. Raises Conflict if
        the key was used for other fields, or for a pipeline. A key lives as
        long as its job."""
        if key is not None:
            _check_key(key)
        job = _new_job(fields, self.tasks, self.config["timeout_unit"], self.clock())
        return self._once(key, "job", fields,
                          lambda found: self.lifecycle.accept(job, key=found),
                          lambda: _job_json(job), self.job)

    def _once(self, key, kind, fields, accept, created, existing):
        """Store what a POST makes: accept(key) and (created(), True); with a key
        that made something before, (its JSON, from existing(id), False) instead;
        Conflict if that key came with another request."""
        self._refuse_when_stopping()
        if key is None:
            accept(None)
            return created(), True
        digest = _digest(kind, fields)
        while True:
            found = self._store.find_key(key)
            if found is not None and (found["kind"], found["digest"]) != (kind, digest):
                raise Conflict(f"Idempotency-Key {key!r} was used for another request (it "
                               f"made {found['kind']} {found['id']!r}); a new {kind} needs "
                               f"a new key")
            item = None if found is None else existing(found["id"])
            if item is not None:
                return item, False
            if accept((key, digest)):
                return created(), True
            # another request with this key was stored first: answer with its item

    def job(self, job_id: str) -> dict | None:
        """The job's JSON (as GET /jobs/{id} gives it), or None."""
        self._refuse_when_closed()
        job = self._store.get(job_id)
        return None if job is None else self._json_of_job(job)

    def wait(self, job_id: str, timeout: float | None = None) -> dict | None:
        """Block until the job has finished, `timeout` seconds have passed, or valet is
        stopping; return its JSON then, whatever its status (None if there is no such
        job)."""
        self._refuse_when_closed()
        deadline = None if timeout is None else self._monotonic() + timeout
        while True:
            with self.lifecycle.watching(job_id) as changed:
                job = self._store.get(job_id)
                left = None if deadline is None else deadline - self._monotonic()
                if (job is None or job["status"] in FINISHED or self.stopping
                        or (left is not None and left <= 0)):
                    return None if job is None else self._json_of_job(job)
                if self.node is not None and not self.node.listen:  # (else, heard)
                    left = min(left or math.inf, self.node.poll)
                changed.wait(left)

    def list_jobs(self, status: str | None = None, limit: int = DEFAULT_PAGE_SIZE,
                  cursor: str | None = None, order: str = "asc", task_name: str | None = None,
                  name: str | None = None, created_after: str | None = None,
                  created_before: str | None = None) -> dict:
        """A page of jobs in submission order (order="desc": newest first), as GET
        /jobs gives it: {"jobs": [...], "next_cursor": ...}; pass next_cursor as
        `cursor` for the next page, in the same order. Only jobs with this status,
        task_name and name, created after and before these RFC 3339 times, where
        given. Raises Invalid naming every argument that is wrong."""
        self._refuse_when_closed()
        status, limit, after, query = _page(status, limit, cursor, order, task_name, name,
                                            created_after, created_before)
        found = self._store.list(status, after, limit + 1, **query)
        return {"jobs": [self._json_of_job(job) for job in found[:limit]],
                "next_cursor": _next_cursor(found, limit)}

    def delete_jobs(self, status: str | None = None,
                    finished_before: str | None = None) -> dict:
        """Delete finished jobs that are not in a pipeline, with their results: those
        with this status (COMPLETED, FAILED or CANCELLED) and/or finished before
        this RFC 3339 time; at least one must be given. Returns {"deleted": N}.
        Jobs that have not finished are never deleted by it. Raises Invalid."""
        statuses, before = _bulk_filter(status, finished_before)
        self._refuse_when_stopping()
        deleted = 0
        while True:  # in batches, so that other writes go on between them
            batch = self._store.purge(before, statuses, _PURGE_BATCH)
            deleted += batch
            if batch < _PURGE_BATCH:
                break
        log.info("deleted %d finished job(s) (status %s, finished before %s)", deleted,
                 status or "any", finished_before or "any time")
        return {"deleted": deleted}

    def update_job(self, job_id: str, fields: dict):
        """Change a job's name and/or description. Raises Invalid or NotFound."""
        changes = _changes(fields, "job", (*JOB_FIELDS, *_JOB_INPUT))
        self._refuse_when_stopping()
        if not self._store.update(job_id, changes):
            raise _not_found("job", job_id)

    def delete_job(self, job_id: str):
        """Delete a job that is not running, with its result. Raises NotFound, or
        Conflict if it is running or belongs to a pipeline."""
        self._refuse_when_stopping()
        self.lifecycle.delete(job_id)

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> dict:
        """Cancel a job that has not finished; return its JSON. Raises NotFound,
        Conflict (it has finished) or ShuttingDown."""
        self._refuse_when_stopping()
        job, cancelled = self.lifecycle.cancel(job_id, reason)
        if job is None:
            raise _not_found("job", job_id)
        if not cancelled:
            raise Conflict(f"job {job_id!r} has finished (status {job['status']}); only a "
                           f"job that has not finished can be cancelled")
        log.debug("job %s: cancelled", job_id)
        return self._json_of_job(job)

    def retry(self, job_id: str) -> dict:
        """Run a FAILED or CANCELLED job again, as a new attempt (its attempts go on
        counting); return its JSON, PENDING. Its result is deleted. Raises NotFound,
        Conflict (another status, or a job of a pipeline), BacklogFull, StorageError
        or ShuttingDown."""
        self._refuse_when_stopping()
        return self._json_of_job(self.lifecycle.retry(job_id))

    def retry_jobs(self, status: str, task_name: str | None = None) -> dict:
        """retry() every job with this status (FAILED or CANCELLED), of this task if
        given, that is not in a pipeline, oldest first, while the backlog has
        room: {"retried": N, "more": True if some were left for want of room}.
        Raises Invalid."""
        check = _Fields({"status": status, "task_name": task_name})
        if not (isinstance(status, str) and status.upper() in (FAILED, CANCELLED)):
            check.problem(f"status must be FAILED or CANCELLED, got {_show(status)}")
        task_name = check.text("task_name", required=False)
        check.raise_problems()
        self._refuse_when_stopping()
        retried, after = 0, 0
        while True:
            jobs = self._store.list(status.upper(), after, MAX_PAGE_SIZE, task_name=task_name)
            for job in jobs:
                try:
                    self.lifecycle.retry(job["id"])
                    retried += 1
                except BacklogFull:
                    return {"retried": retried, "more": True}
                except (NotFound, Conflict):  # a job of a pipeline, or one moved meanwhile
                    continue
            if len(jobs) < MAX_PAGE_SIZE:
                return {"retried": retried, "more": False}
            after = jobs[-1]["seq"]

    def result(self, job_id: str, strict: bool = False) -> dict | None:
        """The finished job's {"job_id", "metadata", "error"} (as GET /jobs/{id}/results
        gives it), or None while it has none; with strict=True, NotFound saying why
        (no such job, not finished, cancelled, its result deleted)."""
        self._refuse_when_closed()
        result = self._store.result(job_id)
        if result is None and strict:
            job = self._store.get(job_id)
            result = self._store.result(job_id)  # it may have finished since the first read
            if result is None:
                raise _no_result(job_id, job)
        if result is None:
            return None
        return {"job_id": job_id, "metadata": result["value"], "error": result["error"]}

    def delete_result(self, job_id: str):
        """Delete a finished job's result; the job stays. Raises NotFound."""
        self._refuse_when_stopping()
        if not self._store.delete_result(job_id):
            job = self._store.get(job_id)
            if job is None:
                raise _not_found("job", job_id)
            raise NotFound(f"job {job_id!r} has no result to delete (status "
                           f"{job['status']})")

    # -- pipelines

    def submit_pipeline(self, fields: dict, idempotency_key: str | None = None) -> dict:
        """Store a pipeline (the fields of a POST /pipelines body) and queue or schedule
        its first job; return its JSON with its jobs. Raises as submit() does."""
        return self.submit_pipeline_once(fields, idempotency_key)[0]

    def submit_pipeline_once(self, fields: dict, key: str | None) -> tuple:
        """submit_pipeline() once per idempotency key (if not None), as submit_once()."""
        if key is not None:
            _check_key(key)
        pipeline, jobs = _new_pipeline(fields, self.tasks, self.config["timeout_unit"],
                                       self.clock())
        return self._once(key, "pipeline", fields,
                          lambda found: self.lifecycle.accept(*jobs, pipeline=pipeline,
                                                              key=found),
                          lambda: _pipeline_json(dict(pipeline, jobs=jobs)), self.pipeline)

    def pipeline(self, pipeline_id: str) -> dict | None:
        """The pipeline's JSON with its jobs (as GET /pipelines/{id} gives it), or None."""
        self._refuse_when_closed()
        pipeline = self._store.get_pipeline(pipeline_id)
        if pipeline is None or not pipeline["jobs"]:
            return None
        return self._json_of_pipeline(pipeline)

    def pipeline_jobs(self, pipeline_id: str) -> list | None:
        """The JSON of the pipeline's jobs, in order, or None if there is no pipeline."""
        pipeline = self.pipeline(pipeline_id)
        return None if pipeline is None else pipeline["jobs"]

    def list_pipelines(self, status: str | None = None, limit: int = DEFAULT_PAGE_SIZE,
                       cursor: str | None = None) -> dict:
        """A page of pipelines in submission order, as GET /pipelines gives it; as
        list_jobs() for the rest."""
        self._refuse_when_closed()
        status, limit, after, _ = _page(status, limit, cursor)
        found = []
        # A pipeline's status follows from its jobs, so a filtered page reads on, in
        # larger steps, until it has enough.
        step = limit + 1 if status is None else max(limit + 1, 250)
        while len(found) <= limit:
            pipelines = self._store.list_pipelines(after, step)
            found += [pipeline for pipeline in pipelines if pipeline["jobs"] and (
                status is None or _pipeline_status(pipeline["jobs"]) == status)]
            if len(pipelines) < step:
                break
            after = pipelines[-1]["seq"]
        return {"pipelines": [self._json_of_pipeline(p) for p in found[:limit]],
                "next_cursor": _next_cursor(found, limit)}

    def update_pipeline(self, pipeline_id: str, fields: dict):
        """Change a pipeline's name and/or description. Raises Invalid or NotFound."""
        changes = _changes(fields, "pipeline", (*PIPELINE_FIELDS, *_PIPELINE_INPUT))
        self._refuse_when_stopping()
        if not self._store.update(pipeline_id, changes, kind="pipeline"):
            raise _not_found("pipeline", pipeline_id)

    def delete_pipeline(self, pipeline_id: str):
        """Delete a pipeline that is not running, with its jobs and their results.
        Raises NotFound, or Conflict if it is running."""
        self._refuse_when_stopping()
        self.lifecycle.delete_pipeline(pipeline_id)

    def cancel_pipeline(self, pipeline_id: str) -> dict:
        """Cancel what is left of a pipeline; return its JSON. Raises NotFound, Conflict
        (it has finished) or ShuttingDown."""
        self._refuse_when_stopping()
        return self._json_of_pipeline(self.lifecycle.cancel_pipeline(pipeline_id))

    # -- the server

    def periodic(self) -> list:
        """The periodic entries, with the time each fires next (GET /periodic)."""
        return self.scheduler.periodic_json()

    def task_names(self) -> list:
        """The registered task names, sorted (GET /tasks)."""
        return sorted(self.tasks)

    def status(self) -> dict:
        """Version, time, uptime, storage (ok, or the cause of its fault), jobs by
        status, backlog and workers, and the live nodes with several (GET /status,
        which answers 503 while the storage is not ok; then "jobs" is null)."""
        fault = "valet is stopped" if self._closed else self._store.health()
        if self.node is not None and fault is None:
            with contextlib.suppress(StorageError, RuntimeError):
                self.node.count()  # (the backlog as it is now, on every node)
        pool = self.pool.stats()
        return {
            "version": __version__,
            "time": _rfc3339(self.clock()),
            "uptime": (round(self._monotonic() - self.started_at, 3)
                       if self.started_at is not None else 0),
            "storage": {"option": self._store.option, "ok": fault is None,
                        "error": fault},
            "jobs": self._counts() if fault is None else None,
            "queue": {"depth": pool["depth"], "capacity": self.pool.capacity,
                      "accepting": pool["depth"] < self.pool.capacity,
                      "oldest_waiting_seconds": self._waited(pool["oldest"])},
            "workers": {"type": self.config["worker_pool.worker_type"],
                        "busy": pool["busy"], "total": self.pool.size,
                        "abandoned": pool["abandoned"],
                        **{key: pool[key] for key in ("pids", "replaced") if key in pool}},
            **({} if self.node is None else {"nodes": self._nodes(fault)}),
        }

    def _nodes(self, fault):
        """The live nodes sharing the store, for /status (None while it fails)."""
        if fault is not None:
            return None
        try:
            return [{"name": node["name"], "this": node["this"], "host": node["host"],
                     "pid": node["pid"], "version": node["version"],
                     "started_at": _rfc3339(node["started_at"]),
                     "heartbeat_age": round(node["heartbeat_age"], 3)}
                    for node in self.node.nodes()]
        except (StorageError, RuntimeError):
            return None

    def _counts(self):
        """Jobs by status, or None if the store cannot tell now."""
        try:
            return self._store.counts()
        except (StorageError, RuntimeError):  # a fault (logged by the store); or closed
            return None

    def _waited(self, since):
        """Seconds since `since` (wall clock), to the millisecond; None for None."""
        return None if since is None else round(max(0.0, self.clock() - since), 3)

    def metrics_text(self) -> str:
        """Every metric, in the Prometheus text format (GET /metrics). It answers also
        while the store fails: then without the jobs by status."""
        self._refuse_when_closed()
        if self.node is not None:
            with contextlib.suppress(StorageError, RuntimeError):
                self.node.count()  # (the backlog as it is now, on every node)
        pool, counts = self.pool.stats(), self._counts()
        return self.metrics.text({
            "valet_info": [((("version", __version__),), 1)],
            "valet_process_start_time_seconds": self.metrics.started_at,
            "valet_jobs": [((("status", status),), n) for status, n in (counts or {}).items()],
            "valet_oldest_waiting_job_age_seconds": self._waited(pool["oldest"]) or 0,
            "valet_queue_depth": pool["depth"],
            "valet_queue_capacity": self.pool.capacity,
            "valet_workers": self.pool.size,
            "valet_workers_busy": pool["busy"],
            "valet_workers_abandoned": pool["abandoned"],
            "valet_worker_processes_replaced_total": pool.get("replaced", 0),
            "valet_storage_errors_total": self._store.errors,
        })

    def openapi(self) -> dict:
        """The OpenAPI 3.1 document of the HTTP API (GET /openapi.json)."""
        if self._openapi is None:
            self._openapi = _openapi(sorted(self.tasks),
                                     self.config["server.auth_token"] is not None,
                                     self.config["timeout_unit"])
        return self._openapi

    def _json_of_job(self, job):
        """A stored job record as its JSON, with its progress while it runs."""
        progress = self.pool.progress(job["id"]) if job["status"] == IN_PROGRESS else None
        return _job_json(job, progress)

    def _json_of_pipeline(self, pipeline):
        return _pipeline_json(pipeline, self._json_of_job)


def _no_result(job_id, job):
    """The NotFound that says why a job has no result."""
    if job is None:
        return _not_found("job", job_id)
    if job["status"] == CANCELLED:
        return NotFound(f"job {job_id!r} was cancelled, so it has no result "
                        f"({job['failure_reason']})")
    if job["status"] in FINISHED:
        return NotFound(f"the result of job {job_id!r} was deleted")
    return NotFound(f"job {job_id!r} has not finished; its status is {job['status']}")


# ------------------------------------------------------------------- client --

class _ClientError(Exception):
    """What ends a client command: its message, and the exit code."""

    def __init__(self, message, code=3):
        super().__init__(message)
        self.code = code


def _client_parser():
    """The command line of the client: python valet.py COMMAND ..."""
    common = argparse.ArgumentParser(add_help=False)  # also after the command
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the server (default: VALET_URL, or http://127.0.0.1:8080); "
                             "the token comes from VALET_AUTH_TOKEN")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON, for scripts")
    parser = argparse.ArgumentParser(
        prog="valet", parents=[common],
        description="A client for a running valet (the token comes from "
                    "VALET_AUTH_TOKEN). Without a command, python valet.py runs the server.")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", parents=[common], help="submit a job")
    submit.add_argument("task")
    given = submit.add_mutually_exclusive_group()
    given.add_argument("--metadata", help="the job's metadata, as JSON")
    given.add_argument("--metadata-file", help="a file holding the metadata, as JSON")
    submit.add_argument("--name", help="the job's name (default: the task's)")
    submit.add_argument("--timeout", type=float, help="its timeout, in timeout_units")
    submit.add_argument("--run-at", help="when to run it, in RFC 3339")
    submit.add_argument("--wait", action="store_true",
                        help="wait until it has finished; exit 1 if it did not complete")
    jobs = commands.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--task")
    jobs.add_argument("--limit", type=int, default=20)
    for name, what in (("show", "a job"), ("result", "a finished job's result"),
                       ("cancel", "cancel a job"), ("retry", "retry a failed job"),
                       ("delete", "delete a job")):
        commands.add_parser(name, parents=[common], help=what).add_argument("id")
    commands.add_parser("tasks", parents=[common], help="the registered tasks")
    commands.add_parser("status", parents=[common], help="the server's health and load")
    return parser


def _request(url, method, path, body=None):
    """One request to the server: its JSON answer, or _ClientError (exit code 3) with
    the server's message, or saying it cannot be reached."""
    parts = urllib.parse.urlsplit(url)
    connection = (http.client.HTTPSConnection if parts.scheme == "https"
                  else http.client.HTTPConnection)(parts.netloc, timeout=MAX_WAIT + 10)
    headers = {"Accept": "application/json"}
    if os.environ.get("VALET_AUTH_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['VALET_AUTH_TOKEN']}"
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, parts.path.rstrip("/") + path, data, headers)
        answer = connection.getresponse()
        text = answer.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _ClientError(f"cannot reach {url}: {exc}") from None
    finally:
        connection.close()
    try:
        value = json.loads(text) if text else None
    except ValueError:
        raise _ClientError(f"{url} answered {answer.status} with something that is not "
                           f"valet's JSON") from None
    if answer.status >= 400:
        message = value.get("message") if isinstance(value, dict) else None
        raise _ClientError(f"{answer.status}: {message or answer.reason}")
    return value


def _table(rows, columns):
    """Rows of dicts as a plain text table, each column as wide as its widest cell."""
    cells = [[str(row.get(column) if row.get(column) is not None else "-")
              for column in columns] for row in rows]
    widths = [max([len(column), *(len(row[i]) for row in cells)])
              for i, column in enumerate(columns)]
    lines = [[column.upper() for column in columns], *cells]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths))
                     .rstrip() for line in lines)


def _submit_fields(args):
    """The body of POST /jobs from `valet submit`'s arguments."""
    text = args.metadata
    if args.metadata_file is not None:
        try:
            with open(args.metadata_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise _ClientError(f"--metadata-file: {exc.strerror}: {args.metadata_file}",
                               2) from None
    fields = {"name": args.name or args.task, "task_name": args.task}
    if text is not None:
        try:
            fields["metadata"] = json.loads(text)
        except ValueError as exc:
            raise _ClientError(f"the metadata is not JSON: {exc}", 2) from None
    if args.timeout is not None:
        fields["timeout"] = args.timeout
    if args.run_at is not None:
        fields["run_at"] = args.run_at
    return fields


def _client_command(args):
    """Do what the command asks: (what to print, the exit code)."""
    url, quote = args.url, urllib.parse.quote
    if args.command == "submit":
        job = _request(url, "POST", "/jobs", _submit_fields(args))
        while args.wait and job["status"] not in FINISHED:
            job = _request(url, "GET", f"/jobs/{quote(job['id'])}?wait={MAX_WAIT}")
        failed = args.wait and job["status"] != COMPLETED
        why = f": {job['failure_reason']}" if failed and job["failure_reason"] else ""
        return job, f"job {job['id']} {job['status']}{why}", (1 if failed else 0)
    if args.command == "jobs":
        query = {"order": "desc", "limit": args.limit, "status": args.status,
                 "task_name": args.task}
        page = _request(url, "GET", "/jobs?" + urllib.parse.urlencode(
            {key: value for key, value in query.items() if value is not None}))
        return page, _table(page["jobs"], ("id", "status", "task_name", "name",
                                           "created_at")), 0
    if args.command in ("show", "result"):
        found = _request(url, "GET", f"/jobs/{quote(args.id, safe='')}"
                                     f"{'/results' if args.command == 'result' else ''}")
        if args.command == "result" and found["error"] is not None:
            return found, f"job {args.id} failed: {found['error']}", 1
        shown = found if args.command == "show" else found["metadata"]
        return found, json.dumps(shown, indent=2), 0
    if args.command in ("cancel", "retry"):
        job = _request(url, "POST", f"/jobs/{quote(args.id, safe='')}/{args.command}")
        return job, f"job {job['id']} {job['status']}", 0
    if args.command == "delete":
        _request(url, "DELETE", f"/jobs/{quote(args.id, safe='')}")
        return {"deleted": args.id}, f"job {args.id} deleted", 0
    if args.command == "tasks":
        found = _request(url, "GET", "/tasks")
        return found, "\n".join(found["tasks"]), 0
    return _status_lines(_request(url, "GET", "/status"))


def _status_lines(status):
    """`valet status`: (the status, its lines, 0)."""
    storage, queue_, workers = status["storage"], status["queue"], status["workers"]
    jobs = status.get("jobs") or {}
    oldest = queue_.get("oldest_waiting_seconds")
    return status, "\n".join((
        f"valet {status['version']}, up {status['uptime']:g}s",
        f"storage: {storage['option']}, {'ok' if storage['ok'] else storage['error']}",
        "jobs: " + (", ".join(f"{n} {s.lower()}" for s, n in jobs.items()) or "unknown"),
        f"queue: {queue_['depth']} of {queue_['capacity']} waiting"
        + (f", the oldest for {oldest:g}s" if oldest is not None else ""),
        f"workers: {workers['busy']} of {workers['total']} busy, "
        f"{workers['abandoned']} abandoned",
        *([] if "nodes" not in status else [
            "nodes: " + (", ".join(node["name"] + (" (this one)" if node["this"] else "")
                                   for node in status["nodes"])
                         if status["nodes"] is not None else "unknown")]))), 0


def _client(argv):
    """Run one client command; return its exit code: 0 ok, 1 the job failed (submit
    --wait), 2 usage, 3 the server could not be reached or refused."""
    args = _client_parser().parse_args(argv)  # exits 2 on a usage error
    args.url = getattr(args, "url", None) or os.environ.get("VALET_URL",
                                                            "http://127.0.0.1:8080")
    as_json = getattr(args, "json", False)
    try:
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _ClientError(f"--url (or VALET_URL) must be http://HOST:PORT or "
                               f"https://..., got {args.url!r}", 2)
        value, text, code = _client_command(args)
    except _ClientError as exc:
        print(f"valet: {exc}", file=sys.stderr)
        return exc.code
    # A job that failed is told on stderr, so that `valet result ID > out.json`
    # leaves no message in the file (with --json, its JSON still goes to stdout).
    try:
        print(json.dumps(value, indent=2) if as_json else text,
              file=sys.stderr if code and not as_json else sys.stdout, flush=True)
    except BrokenPipeError:  # (piped into head, say): the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


_CLIENT_COMMANDS = ("submit", "jobs", "show", "result", "cancel", "retry", "delete",
                    "tasks", "status")


_SERVER_HELP = (f"an asynchronous job server; python valet.py "
                f"{{{','.join(_CLIENT_COMMANDS)}}} -h for its client")


def _is_client(argv):
    """Whether the command line names a client command (after --url U and --json)."""
    rest = list(argv)
    while rest and (rest[0] == "--json" or rest[0].startswith("--url")):
        rest = rest[2:] if rest[0] == "--url" else rest[1:]
    return bool(rest) and rest[0] in _CLIENT_COMMANDS


# ---------------------------------------------------------------- dashboard --

# The page at GET /: HTML, CSS and JavaScript in one, with nothing from elsewhere.
# It asks for the token (with one set) and keeps it in the tab's sessionStorage.
_DASHBOARD_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>valet</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #f6f7f9; --panel: #fff; --fg: #1c2330; --muted: #5b6575; --line: #dde1e7; --accent: #2456c9;
  --accent-soft: #e8eefb; --hover: #f3f6fb; --code: #f2f4f7; --err: #a4161a; --err-bg: #fdecec; --input: #c5cbd4; color-scheme: light;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
* { box-sizing: border-box; } [hidden] { display: none !important; }
body { margin: 0; background: var(--bg); color: var(--fg); }
button, input, select, textarea { font: inherit; color: inherit; } button { cursor: pointer; }
h2 { font-size: 16px; margin: 0; }
h3 { font-size: 12px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.mono, pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.muted { color: var(--muted); } .spacer { flex: 1; }
.top { background: var(--panel); border-bottom: 1px solid var(--line); }
.top .row { max-width: 1440px; margin: 0 auto; padding: 10px 20px; display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 20px; }
.brand { font-size: 18px; font-weight: 700; } .brand small { font-size: 13px; font-weight: 400; color: var(--muted); }
.health { display: flex; align-items: center; gap: 6px; } .health.bad { color: var(--err); font-weight: 600; }
.dot { width: 9px; height: 9px; border-radius: 50%; background: var(--muted); align-self: center; }
.dot.ok { background: #1f9d55; } .dot.bad { background: #d92d20; }
.figures { display: flex; flex-wrap: wrap; gap: 4px 18px; color: var(--muted); margin-left: auto; }
.figures b { color: var(--fg); font-weight: 600; font-variant-numeric: tabular-nums; }
.link { background: none; border: 0; padding: 0; color: var(--accent); text-decoration: underline; }
.wrap { max-width: 1440px; margin: 0 auto; padding: 14px 20px 40px; }
.notice { display: flex; gap: 12px; align-items: flex-start; justify-content: space-between; padding: 10px 14px; border-radius: 8px;
  margin-bottom: 12px; border: 1px solid; overflow-wrap: anywhere; }
.notice.error { background: var(--err-bg); color: var(--err); border-color: #f2b8b5; }
.notice.info { background: var(--accent-soft); color: #173a8a; border-color: #c3d3f5; }
.notice button { background: none; border: 0; color: inherit; font-weight: 600; padding: 0; }
.tiles { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 10px; margin-bottom: 14px; }
.tile { text-align: left; background: var(--panel); border: 1px solid var(--line); border-left: 4px solid var(--b-line);
  border-radius: 8px; padding: 8px 12px; min-width: 0; }
.tile:hover { border-color: var(--b-line); }
.tile[aria-pressed="true"] { background: var(--b-bg); box-shadow: 0 0 0 2px var(--b-line) inset; }
.tile .n { display: block; font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
.tile .l { display: block; font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.s-SCHEDULED { --b-bg: #efeafd; --b-fg: #4c2a9e; --b-line: #7c5cdb; } .s-PENDING { --b-bg: #fdf1d8; --b-fg: #7a4a00; --b-line: #d99a0b; }
.s-IN_PROGRESS { --b-bg: #e1ecfd; --b-fg: #1a4595; --b-line: #2f6fe0; } .s-COMPLETED { --b-bg: #dff3e6; --b-fg: #14593a; --b-line: #23a15a; }
.s-FAILED { --b-bg: #fde3e1; --b-fg: #92140f; --b-line: #d92d20; } .s-CANCELLED { --b-bg: #e8eaee; --b-fg: #3c4452; --b-line: #8a93a3; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; letter-spacing: .02em;
  background: var(--b-bg, #eee); color: var(--b-fg, #333); white-space: nowrap; }
.tabs { display: flex; gap: 2px; border-bottom: 1px solid var(--line); margin-bottom: 12px; overflow-x: auto; }
.tabs button { background: none; border: 0; border-bottom: 3px solid transparent; padding: 8px 14px; color: var(--muted);
  font-weight: 600; white-space: nowrap; }
.tabs button[aria-selected="true"] { color: var(--fg); border-bottom-color: var(--accent); }
.layout { display: grid; grid-template-columns: minmax(0, 1fr); gap: 16px; align-items: start; }
.layout.open { grid-template-columns: minmax(0, 1fr) minmax(360px, 460px); } .layout.open .hide-open { display: none; }
.toolbar { display: flex; flex-wrap: wrap; gap: 8px 12px; align-items: center; margin-bottom: 10px; }
.toolbar label { display: flex; gap: 6px; align-items: center; color: var(--muted); }
select, input, textarea { background: var(--panel); border: 1px solid var(--input); border-radius: 6px; padding: 5px 8px; font-weight: 400; }
textarea { width: 100%; resize: vertical; }
.btn { background: var(--panel); border: 1px solid var(--input); border-radius: 6px; padding: 5px 12px; font-weight: 600; }
.btn:hover:not(:disabled) { border-color: var(--accent); color: var(--accent); } .btn:disabled { opacity: .5; cursor: default; }
.btn.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
.btn.primary:hover:not(:disabled) { color: #fff; filter: brightness(1.1); } .btn.danger { color: var(--err); border-color: #e3a29e; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
table { width: 100%; border-collapse: collapse; table-layout: fixed; }
th, td { text-align: left; padding: 8px 12px; border-bottom: 1px solid var(--line); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
th { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .04em; background: var(--code); }
tbody tr[tabindex] { cursor: pointer; } tbody tr[tabindex]:hover { background: var(--hover); } tbody tr:last-child td { border-bottom: 0; }
tbody tr.selected { background: var(--accent-soft); box-shadow: 3px 0 0 var(--accent) inset; }
td.num { font-variant-numeric: tabular-nums; } col.c-status { width: 140px; } col.c-when { width: 104px; }
.sub { display: none; font-size: 12px; color: var(--muted); }
.nmrow { display: flex; gap: 6px; align-items: baseline; min-width: 0; }
.nmrow .nm { min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.tag { flex: none; font-size: 11px; color: var(--muted); border: 1px solid var(--line); border-radius: 4px; padding: 0 5px; line-height: 1.5; }
td.wrapcell, td.wrapcell .sub { white-space: normal; overflow-wrap: anywhere; }
.note { margin: 8px 0 4px; font-size: 13px; overflow-wrap: anywhere; }
.empty { padding: 28px 12px; text-align: center; color: var(--muted); }
.pager { display: flex; gap: 8px; align-items: center; justify-content: flex-end; margin-top: 10px; }
#detail { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px 18px;
  position: sticky; top: 12px; max-height: calc(100vh - 24px); overflow: auto; }
.dhead { display: flex; gap: 10px; align-items: flex-start; } .dhead h2 { flex: 1; overflow-wrap: anywhere; }
.close { background: none; border: 1px solid var(--line); border-radius: 6px; width: 30px; height: 30px; font-size: 18px; line-height: 1; }
.actions { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0 4px; }
dl.fields { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 4px 14px; margin: 0; }
dl.fields dt { color: var(--muted); } dl.fields dd { margin: 0; overflow-wrap: anywhere; }
pre { background: var(--code); border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; margin: 0; font-size: 12px;
  line-height: 1.5; max-height: 300px; overflow: auto; white-space: pre; }
.reason { color: var(--err); font-weight: 600; margin: 0 0 6px; overflow-wrap: anywhere; }
.bar { height: 8px; background: var(--line); border-radius: 4px; overflow: hidden; margin: 4px 0; }
.bar span { display: block; height: 100%; width: 0; background: var(--accent); transition: width .4s; }
ol.pipe { list-style: none; margin: 0; padding: 0; counter-reset: step; } ol.pipe li { counter-increment: step; }
ol.pipe button { width: 100%; display: flex; align-items: center; gap: 8px; text-align: left; background: none; border: 0;
  border-radius: 6px; padding: 6px 8px; }
ol.pipe button::before { content: counter(step); color: var(--muted); width: 1.4em; font-variant-numeric: tabular-nums; }
ol.pipe button:hover { background: var(--hover); } ol.pipe button.current { background: var(--accent-soft); font-weight: 600; }
ol.pipe .pn { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.form { max-width: 640px; display: grid; gap: 12px; padding: 16px; }
.form label { display: grid; gap: 4px; font-weight: 600; } .form .hint { font-weight: 400; color: var(--muted); font-size: 13px; }
.field-error { color: var(--err); margin: 0; font-weight: 500; overflow-wrap: anywhere; }
[aria-invalid="true"] { border-color: var(--err); outline-color: var(--err); }
.panel-box { margin-top: 14px; padding: 12px 14px; }
#token-panel { max-width: 460px; margin: 40px auto; padding: 20px; } #token-panel form { display: grid; gap: 10px; }
dialog { border: 1px solid var(--line); border-radius: 10px; padding: 18px; max-width: min(440px, calc(100vw - 32px));
  background: var(--panel); color: var(--fg); }
dialog::backdrop { background: rgba(20, 26, 36, .35); } dialog .actions { justify-content: flex-end; margin-top: 14px; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
@media (max-width: 980px) {
  .layout.open { grid-template-columns: minmax(0, 1fr); } .figures { margin-left: 0; }
  #detail { position: fixed; inset: 0; z-index: 10; max-height: none; border-radius: 0; border: 0; }
}
@media (max-width: 640px) {
  .top .row, .wrap { padding-left: 12px; padding-right: 12px; } th, td { padding: 8px; }
  .tiles { grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; } .tile .n { font-size: 19px; }
  .hide-sm { display: none; } .sub { display: block; overflow: hidden; text-overflow: ellipsis; } .tabs button { padding: 8px 10px; }
  .tile .l { font-size: 11px; letter-spacing: 0; }
  col.c-status { width: 128px; } col.c-when { width: 84px; } .nmrow .tag { display: none; }
  .toolbar label { flex: 1 1 150px; } .toolbar select { flex: 1; min-width: 0; }
}
@media (prefers-color-scheme: dark) {
  :root { --bg: #12161c; --panel: #1a1f27; --fg: #e4e8ee; --muted: #9aa4b2; --line: #2e3540; --accent: #6c9cff; --input: #3a4350;
    --accent-soft: #1e2b45; --hover: #202734; --code: #151a21; --err: #ff8a80; --err-bg: #3a1d1d; color-scheme: dark; }
  .btn.primary, .btn.primary:hover:not(:disabled) { color: #0c1220; }
  .notice.info { color: #c9d8ff; border-color: #2f4470; } .notice.error { border-color: #6b2b2b; }
  .s-SCHEDULED { --b-bg: #2d2450; --b-fg: #d4c6ff; } .s-PENDING { --b-bg: #3d2f12; --b-fg: #fbd68a; }
  .s-IN_PROGRESS { --b-bg: #1c3159; --b-fg: #b9d0ff; } .s-COMPLETED { --b-bg: #163a26; --b-fg: #a6e9bf; }
  .s-FAILED { --b-bg: #4a1c1a; --b-fg: #ffb4ad; } .s-CANCELLED { --b-bg: #2c323c; --b-fg: #cdd3dc; }
}
</style>
</head>
<body>
<header class="top"><div class="row">
  <div class="brand">valet <small id="version"></small></div>
  <div class="health" id="health"><span class="dot"></span><span id="health-text">connecting…</span></div>
  <div class="figures" id="figures"><span>queue <b id="f-queue">–</b></span> <span>oldest waiting <b id="f-oldest">–</b></span>
    <span><span id="f-kind">workers</span> busy <b id="f-workers">–</b></span> <span><span id="f-lost">abandoned</span> <b id="f-abandoned">–</b></span>
    <span id="f-nodes-box" hidden>nodes <b id="f-nodes">–</b></span>
    <button class="link" id="forget-token" type="button" hidden>forget token</button></div>
</div></header>
<div class="wrap">
  <div id="notice" class="notice" role="alert" hidden><span id="notice-text"></span>
    <button type="button" id="notice-close" aria-label="Dismiss">Dismiss</button></div>
  <section id="token-panel" class="card" hidden>
    <form id="token-form" method="post" autocomplete="off">
      <h2>This valet needs its access token</h2>
      <p class="muted" style="margin:0">It is valet's <code>server.auth_token</code> setting, or the
        <code>VALET_AUTH_TOKEN</code> environment variable of the server. This page keeps it in this tab only
        (sessionStorage) and sends it as an <code>Authorization: Bearer</code> header.</p>
      <p class="field-error" id="token-error" hidden></p>
      <input type="password" name="token" aria-label="Access token" placeholder="access token" autocomplete="off" required>
      <div><button class="btn primary" type="submit">Use this token</button></div>
    </form>
  </section>
  <div id="app">
    <div class="tiles" id="tiles"></div>
    <nav class="tabs" role="tablist">
      <button type="button" role="tab" data-tab="jobs" aria-selected="true">Jobs</button> <button type="button" role="tab"
        data-tab="pipelines" aria-selected="false">Pipelines</button> <button type="button" role="tab" data-tab="periodic"
        aria-selected="false">Periodic</button> <button type="button" role="tab" data-tab="submit" aria-selected="false">Submit a job</button>
    </nav>
    <div class="layout" id="layout">
      <div>
        <section id="tab-jobs" role="tabpanel">
          <div class="toolbar">
            <label>Status <select id="f-status"><option value="">all</option></select></label>
            <label>Task <select id="f-task"><option value="">all</option></select></label>
            <span class="spacer"></span>
            <button type="button" class="btn" id="bulk-retry">Retry failed jobs</button>
          </div>
          <div class="card">
            <table>
              <colgroup><col><col class="hide-sm" style="width:16%"><col class="c-status">
                <col class="hide-sm hide-open" style="width:100px"><col class="c-when"><col class="hide-sm" style="width:124px"></colgroup>
              <thead><tr><th>Name</th><th class="hide-sm">Task</th><th>Status</th><th class="hide-sm hide-open">Attempts</th>
                <th>Created</th><th class="hide-sm">Duration</th></tr></thead>
              <tbody id="jobs-body"></tbody>
            </table>
            <div class="empty" id="jobs-empty" hidden></div>
          </div>
          <div class="pager" id="jobs-pager"><span class="muted" id="jobs-page"></span>
            <button type="button" class="btn" id="jobs-prev">Previous</button> <button type="button" class="btn" id="jobs-next">Next</button></div>
        </section>
        <section id="tab-pipelines" role="tabpanel" hidden>
          <p class="muted" style="margin:0 0 8px">Oldest first (the order <code>GET /pipelines</code> gives).</p>
          <div class="card">
            <table>
              <colgroup><col><col class="c-status"><col class="hide-sm" style="width:80px"><col class="c-when"></colgroup>
              <thead><tr><th>Name</th><th>Status</th><th class="hide-sm">Done</th><th>Created</th></tr></thead>
              <tbody id="pipes-body"></tbody>
            </table>
            <div class="empty" id="pipes-empty" hidden>No pipelines.</div>
          </div>
          <div class="pager" id="pipes-pager"><button type="button" class="btn" id="pipes-prev">Previous</button>
            <button type="button" class="btn" id="pipes-next">Next</button></div>
          <div class="card panel-box" id="pipe-view" hidden>
            <div class="dhead"><h2 id="pipe-name"></h2><span class="badge" id="pipe-status"></span></div>
            <p class="muted" id="pipe-meta" style="margin:4px 0 8px"></p>
            <div class="actions" id="pipe-actions"><button type="button" class="btn" data-action="cancel-pipeline">Cancel pipeline</button>
              <button type="button" class="btn danger" data-action="delete-pipeline">Delete pipeline</button></div>
            <ol class="pipe" id="pipe-jobs"></ol>
          </div>
        </section>
        <section id="tab-periodic" role="tabpanel" hidden>
          <div class="card">
            <table>
              <colgroup><col><col class="hide-sm" style="width:18%"><col class="hide-sm" style="width:22%"><col style="width:108px">
                <col style="width:108px"></colgroup>
              <thead><tr><th>Name</th><th class="hide-sm">Task</th><th class="hide-sm">Schedule</th><th>Next run</th><th>Last fired</th></tr></thead>
              <tbody id="periodic-body"></tbody>
            </table>
            <div class="empty" id="periodic-empty" hidden>No periodic entries in the config.</div>
          </div>
        </section>
        <section id="tab-submit" role="tabpanel" hidden>
          <form id="submit-form" class="card form" method="post" novalidate>
            <h2>Submit a job</h2>
            <label>Task <select name="task_name" required></select></label>
            <label>Name <span class="hint">optional; defaults to the task's name</span>
              <input name="name" maxlength="200" autocomplete="off"></label>
            <label>Metadata <span class="hint">JSON handed to the task; leave empty for null</span>
              <textarea name="metadata" rows="7" spellcheck="false" class="mono" placeholder='{"text": "a b a"}'></textarea></label>
            <p class="field-error" id="submit-error" hidden></p>
            <div><button class="btn primary" type="submit">Submit</button></div>
          </form>
        </section>
      </div>
      <aside id="detail" hidden aria-label="Job detail">
        <div class="dhead"><h2 data-field="name"></h2>
          <button type="button" class="close" id="detail-close" aria-label="Close">×</button></div>
        <div id="detail-missing" class="empty" hidden>No job with this id.</div>
        <div id="detail-body">
          <span class="badge" data-field="status"></span> <span class="muted" data-field="task_name"></span>
          <div class="actions"><button type="button" class="btn" data-action="cancel">Cancel</button>
            <button type="button" class="btn" data-action="retry">Retry</button> <button type="button" class="btn danger" data-action="delete">Delete</button></div>
          <p class="muted note" id="detail-pipe-note" hidden><span data-field="pipe-note"></span>
            <button type="button" class="link" id="open-pipe">Open the pipeline</button></p>
          <div data-section="progress"><h3>Progress</h3>
            <div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100"><span></span></div>
            <div class="muted" data-field="progress"></div></div>
          <div data-section="failure"><h3 data-field="failure-title">Failure</h3>
            <p class="reason" data-field="failure_reason"></p><pre data-field="failure_traceback"></pre></div>
          <div data-section="result"><h3>Result</h3><pre data-field="result"></pre></div>
          <h3>Details</h3><dl class="fields" id="detail-fields"></dl>
          <div data-section="metadata"><h3>Metadata</h3><pre data-field="metadata"></pre></div>
          <div data-section="pipeline"><h3 data-field="pipeline-title">Pipeline</h3><ol class="pipe" id="detail-pipe"></ol></div>
        </div>
      </aside>
    </div>
  </div>
</div>
<dialog id="confirm" aria-labelledby="confirm-text">
  <p id="confirm-text" style="margin:0"></p>
  <div class="actions"><button type="button" class="btn" data-action="dismiss" autofocus>Keep</button>
    <button type="button" class="btn primary" data-action="confirm" id="confirm-ok">OK</button></div>
</dialog>
<script>
"use strict";
const STATUSES = ["SCHEDULED", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"];
const UNFINISHED = STATUSES.slice(0, 3), FINISHED = STATUSES.slice(3);
const TOKEN_KEY = "valet-token", PAGE = 25, POLL_MS = 2000, NBSP = String.fromCharCode(160);
const $ = (sel, root) => (root || document).querySelector(sel);
const enc = encodeURIComponent;
let token = sessionStorage.getItem(TOKEN_KEY);
let needToken = false, authOk = false, skew = 0, tab = "jobs", tasksLoaded = false;
const filter = { status: "", task: "" };
const jobsPager = { stack: [null], next: null }, pipesPager = { stack: [null], next: null };
let detailId = null, detailJob = null, detailGone = false, resultKey = null, pipeKey = null, detailPipeName = null;
let pipeViewId = null, pipeView = null;  // the pipeline the Pipelines tab shows, and its latest JSON
// ---------------------------------------------------------------- helpers
function el(tag, attrs, ...kids) {  // el("td", {class: "num", text: "3"}, child, ...)
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  e.append(...kids);
  return e;
}
function setText(e, text) { text = text == null ? "" : String(text); if (e.textContent !== text) e.textContent = text; }
function setAttr(e, name, value) { if (e.getAttribute(name) !== value) e.setAttribute(name, value); }
function show(e, on) { if (e.hidden === !!on) e.hidden = !on; }
function enable(e, on) { if (e.disabled === !!on) e.disabled = !on; }
const label = status => (status || "").replace("_", " ");
function badge(e, status) { setText(e, label(status)); setAttr(e, "data-value", status || ""); setAttr(e, "class", "badge s-" + status); }
const now = () => Date.now() + skew;
const ms = iso => (iso ? Date.parse(iso) : NaN);
function pad(n) { return String(n).padStart(2, "0"); }
function absTime(iso) {  // in UTC, as the API, the logs and cron schedules: 2026-12-02 13:00:23 UTC
  const d = new Date(ms(iso));
  return iso && isFinite(d) ? d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate()) + " " +
    pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" + pad(d.getUTCSeconds()) + " UTC" : "";
}
function human(seconds) {  // 0.4 s -> "400 ms", 3.21 -> "3.2 s", 250 -> "4 min"
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.abs(seconds);
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 10) return s.toFixed(1) + " s";
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return (s < 36000 ? (s / 3600).toFixed(1) : Math.floor(s / 3600)) + " h";
  return (s < 864000 ? (s / 86400).toFixed(1) : Math.floor(s / 86400)) + " d";
}
function rel(iso) {
  if (!iso) return "–";
  const d = (now() - ms(iso)) / 1000, t = Math.abs(d) < 60 ? Math.floor(Math.abs(d)) + " s" : human(d);
  return Math.abs(d) < 3 ? "just now" : d > 0 ? t + " ago" : "in " + t;
}
function due(iso) { return ms(iso) - now() < 1000 ? "due now" : "due " + rel(iso); }
function when(iso) { return iso ? absTime(iso) + " (" + rel(iso).replaceAll(" ", NBSP) + ")" : "–"; }  // wraps before "("
function duration(job, suffix) {  // a running job's: how long so far
  return job.duration != null ? human(job.duration / 1000) :
    job.status === "IN_PROGRESS" && job.started_at ? human((now() - ms(job.started_at)) / 1000) + suffix : "–";
}
// -------------------------------------------------------------------- API
class ApiError extends Error { constructor(status, message, data) { super(message); this.status = status; this.data = data; } }
async function api(method, path, body) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let resp;
  try { resp = await fetch(path, init); } catch (e) { setHealth(false, "cannot reach valet; retrying"); throw new ApiError(0, "cannot reach valet"); }
  let data = null;
  try { data = JSON.parse(await resp.text()); } catch (e) { data = null; }  // 204s and odd bodies: null
  const message = (data && data.message) || ("HTTP " + resp.status);
  if (resp.status === 401) { askForToken(message, !!headers["Authorization"]); throw new ApiError(401, message, data); }
  authOk = true;
  if (!resp.ok) throw new ApiError(resp.status, message, data);
  return data;
}
function notice(message, kind) {
  setText($("#notice-text"), message); $("#notice").className = "notice " + (kind || "error"); show($("#notice"), true);
}
function failed(e) { if (e.status !== 401 && e.status !== 0) notice(e.message); }
// ------------------------------------------------------------------- auth
function askForToken(message, hadToken) {
  authOk = false;
  if (hadToken) { sessionStorage.removeItem(TOKEN_KEY); token = null; }
  const err = $("#token-error");
  setText(err, hadToken ? "That token was not accepted. The server says: " + message : "");
  show(err, hadToken);
  if (!needToken) {
    needToken = true;
    show($("#token-panel"), true); show($("#app"), false); show($("#figures"), false);
    setHealth(false, "needs an access token"); $("#token-form").elements.token.focus();
  }
}
$("#token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = ev.target.elements.token, value = input.value.trim();
  if (!value) return input.focus();
  token = value; input.value = ""; sessionStorage.setItem(TOKEN_KEY, token); needToken = false;
  show($("#token-panel"), false); show($("#app"), true); show($("#figures"), true); show($("#forget-token"), true);
  setHealth(true, "connecting…"); refresh();
});
$("#forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY); token = null; show($("#forget-token"), false);
  refresh();
});
// ----------------------------------------------------------------- status
function setHealth(ok, text) {
  $("#health").classList.toggle("bad", !ok); setAttr($(".dot"), "class", "dot " + (ok ? "ok" : "bad")); setText($("#health-text"), text);
}
for (const s of STATUSES) {
  const b = el("button", { type: "button", class: "tile s-" + s, "data-count": s, "aria-pressed": "false",
    title: "Show " + label(s).toLowerCase() + " jobs" }, el("span", { class: "n", text: "–" }), el("span", { class: "l", text: label(s) }));
  b.addEventListener("click", () => setStatusFilter(filter.status === s ? "" : s));
  $("#tiles").append(b); $("#f-status").append(el("option", { value: s, text: label(s) }));
}
async function loadStatus() {
  let s;
  try { s = await api("GET", "/status"); } catch (e) {
    if (e.data && e.data.storage) s = e.data; else return;  // 503 while the storage fails
  }
  if (s.time) skew = ms(s.time) - Date.now();
  setText($("#version"), s.version || "");
  const st = s.storage || {};
  const here = (s.nodes || []).find(n => n.this);
  setHealth(!!st.ok, (st.option || "storage") + (here ? " · node " + here.name : "") + (st.ok ? " · ok" : " · failing: " + (st.error || "unknown error")));
  const q = s.queue || {}, w = s.workers || {};
  setText($("#f-queue"), q.depth + " / " + q.capacity + (q.accepting === false ? " (full)" : ""));
  setText($("#f-oldest"), q.oldest_waiting_seconds == null ? (q.depth ? "–" : "none") : human(q.oldest_waiting_seconds));
  const processes = w.type === "process";
  setText($("#f-kind"), processes ? "processes" : "threads");
  setText($("#f-workers"), w.busy + " / " + w.total);
  setText($("#f-lost"), processes ? "replaced" : "abandoned");
  setText($("#f-abandoned"), processes ? w.replaced : w.abandoned);
  const nodes = s.nodes, box = $("#f-nodes-box");
  box.hidden = !("nodes" in s);
  setText($("#f-nodes"), Array.isArray(nodes) ? String(nodes.length) : "–");
  box.title = Array.isArray(nodes) ? nodes.map(n => n.name + (n.this ? " (this one)" : "")).join(", ") : "";
  const counts = s.jobs || {};
  for (const b of document.querySelectorAll("[data-count]")) setText($(".n", b), counts[b.dataset.count] ?? "–");
  enable($("#bulk-retry"), counts.FAILED !== 0);
}
// ------------------------------------------------------------------- jobs
const jobRows = new Map();
function syncRows(tbody, map, items, key, make, update) {
  const seen = new Set();
  let prev = null;
  for (const item of items) {
    const id = key(item);
    let tr = map.get(id);
    if (!tr) { tr = make(id); map.set(id, tr); }
    update(tr, item);
    seen.add(id);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
  }
  for (const [id, tr] of map) if (!seen.has(id)) { tr.remove(); map.delete(id); }
}
function makeJobRow(id) {
  const tr = el("tr", { "data-job-id": id, tabindex: "0" },
    el("td", {}, el("div", { class: "nmrow" }, el("span", { class: "nm" }), el("span", { class: "tag", hidden: "" })),
      el("span", { class: "sub" })), el("td", { class: "hide-sm" }),
    el("td", {}, el("span", { class: "badge" })), el("td", { class: "num hide-sm hide-open" }),
    el("td", { class: "num" }), el("td", { class: "num hide-sm" }));
  return clickable(tr, () => openJob(id));
}
function clickable(tr, fn) {
  tr.addEventListener("click", fn); tr.addEventListener("keydown", ev => { if (ev.key === "Enter") fn(); });
  return tr;
}
function updateJobRow(tr, job) {
  const c = tr.cells;
  setText($(".nm", c[0]), job.name); setText($(".sub", c[0]), job.task_name + (job.pipeline_id ? " · pipeline" : ""));
  setAttr(c[0], "title", job.name + (job.pipeline_id ? " (a job of a pipeline)" : ""));
  const tag = $(".tag", c[0]); setText(tag, job.pipeline_id ? "pipeline" : ""); show(tag, !!job.pipeline_id);
  setText(c[1], job.task_name); badge($(".badge", c[2]), job.status);
  setText(c[3], job.attempts); setAttr(c[3], "title", "max retries " + job.max_retries);
  setText(c[4], rel(job.created_at)); setAttr(c[4], "title", absTime(job.created_at));
  const waits = job.status === "SCHEDULED" && !!job.run_at;  // when it is due instead of a duration
  setText(c[5], waits ? due(job.run_at) : duration(job, "")); c[5].classList.toggle("muted", job.duration == null);
  if (waits) setAttr(c[5], "title", "runs at " + absTime(job.run_at)); else c[5].removeAttribute("title");
  tr.classList.toggle("selected", job.id === detailId);
}
function jobsQuery() {  // newest first; empty values count as not given
  const cursor = jobsPager.stack[jobsPager.stack.length - 1] || "";
  return new URLSearchParams({ order: "desc", limit: PAGE, status: filter.status, task_name: filter.task, cursor }).toString();
}
async function loadJobs() {
  const q = jobsQuery();
  let data;
  try { data = await api("GET", "/jobs?" + q); } catch (e) { failed(e); return; }
  if (q !== jobsQuery()) return;  // the filter or page changed meanwhile
  syncRows($("#jobs-body"), jobRows, data.jobs, j => j.id, makeJobRow, updateJobRow);
  jobsPager.next = data.next_cursor;
  const empty = $("#jobs-empty");
  setText(empty, filter.status || filter.task ? "No jobs match these filters." : "No jobs yet. Submit one from the “Submit a job” tab.");
  show(empty, data.jobs.length === 0);
  pagerButtons(jobsPager, "#jobs-prev", "#jobs-next");
  setText($("#jobs-page"), jobsPager.stack.length > 1 ? "page " + jobsPager.stack.length : "");
}
function pagerButtons(p, prev, next) {
  enable($(prev), p.stack.length > 1); enable($(next), !!p.next);
  show($(prev).parentNode, p.stack.length > 1 || !!p.next);
}
function turn(p, forward, load) {
  if (forward && p.next) p.stack.push(p.next); else if (!forward && p.stack.length > 1) p.stack.pop(); else return;
  p.next = null; load();
}
function resetJobs() {
  jobsPager.stack = [null]; jobsPager.next = null;
  for (const b of document.querySelectorAll("[data-count]")) setAttr(b, "aria-pressed", String(b.dataset.count === filter.status));
  loadJobs();
}
function setStatusFilter(s) { filter.status = s; $("#f-status").value = s; selectTab("jobs"); resetJobs(); }
$("#f-status").addEventListener("change", ev => setStatusFilter(ev.target.value));
$("#f-task").addEventListener("change", ev => { filter.task = ev.target.value; resetJobs(); });
$("#jobs-prev").addEventListener("click", () => turn(jobsPager, false, loadJobs));
$("#jobs-next").addEventListener("click", () => turn(jobsPager, true, loadJobs));
async function loadTasks() {
  let data;
  try { data = await api("GET", "/tasks"); } catch (e) { failed(e); return; }
  tasksLoaded = true;
  for (const sel of [$("#f-task"), $("#submit-form").elements.task_name]) {
    const keep = sel.value;
    sel.replaceChildren(...(sel.id === "f-task" ? [el("option", { value: "", text: "all" })] : []),
      ...data.tasks.map(t => el("option", { value: t, text: t })));
    if (keep && data.tasks.includes(keep)) sel.value = keep;
  }
}
// -------------------------------------------------------------- job detail
const field = name => $('#detail [data-field="' + name + '"]');
const section = name => $('#detail [data-section="' + name + '"]');
function openJob(id) {
  if (!id) return;
  if (id !== detailId) {
    detailId = id; detailJob = null; detailGone = false; resultKey = null; pipeKey = null; detailPipeName = null;
    setText(field("name"), "Loading…"); show($("#detail-body"), false); show($("#detail-missing"), false);
    setText(field("result"), ""); setText(field("failure_traceback"), "");
    $("#detail-pipe").replaceChildren();
  }
  show($("#detail"), true); $("#layout").classList.add("open");
  if (location.hash !== "#job=" + id) history.replaceState(null, "", "#job=" + enc(id));
  for (const [rid, tr] of jobRows) tr.classList.toggle("selected", rid === id);
  loadDetail();
}
function closeDetail() {
  detailId = detailJob = null;
  show($("#detail"), false); $("#layout").classList.remove("open");
  for (const tr of jobRows.values()) tr.classList.remove("selected");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}
$("#detail-close").addEventListener("click", closeDetail);
document.addEventListener("keydown", ev => { if (ev.key === "Escape" && detailId && !$("#confirm").open) closeDetail(); });
window.addEventListener("hashchange", fromHash);
function fromHash() {  // a link may hold anything: a bad one is ignored
  const h = location.hash;
  if (h.startsWith("#job=")) {
    let id = null;
    try { id = decodeURIComponent(h.slice(5)); } catch (e) { id = null; }
    if (id) openJob(id);
  }
  const tab = h.startsWith("#tab=") ? h.slice(5) : "";
  if (["jobs", "pipelines", "periodic", "submit"].includes(tab) && document.getElementById("tab-" + tab)) selectTab(tab);
}
async function loadDetail() {
  const id = detailId;
  if (!id || detailGone || !authOk) return;  // (refresh() asks once it knows the token is fine)
  let job;
  try { job = await api("GET", "/jobs/" + enc(id)); } catch (e) {
    if (id !== detailId) return;
    if (e.status === 404) {
      detailGone = true; detailJob = null;
      setText(field("name"), "Job " + id); show($("#detail-body"), false); show($("#detail-missing"), true);
    } else failed(e);
    return;
  }
  if (id !== detailId) return;
  detailJob = job;
  renderDetail(job);
  const rkey = job.status === "COMPLETED" ? job.id + "|" + job.completed_at : null;
  if (rkey && rkey !== resultKey) {
    try {
      const r = await api("GET", "/jobs/" + enc(id) + "/results");
      if (id === detailId) { resultKey = rkey; setText(field("result"), JSON.stringify(r.metadata, null, 2)); }
    } catch (e) { if (e.status === 404 && id === detailId) { resultKey = rkey; setText(field("result"), "(the result was deleted)"); } }
  }
  show(section("result"), !!rkey && resultKey === rkey);
  if (job.pipeline_id) await loadDetailPipeline(job);
  show(section("pipeline"), !!job.pipeline_id);
}
async function loadDetailPipeline(job) {
  if (pipeKey === job.pipeline_id + "|done") { markPipe(job.id); return; }
  let p;
  try { p = await api("GET", "/pipelines/" + enc(job.pipeline_id)); } catch (e) { return; }
  if (job.id !== detailId) return;
  setText(field("pipeline-title"), "Pipeline · " + p.name);
  detailPipeName = p.name; pipeNote(job);
  renderPipeJobs($("#detail-pipe"), p.jobs, job.id);
  pipeKey = job.pipeline_id + (FINISHED.includes(p.status) ? "|done" : "");
}
function renderPipeJobs(ol, jobs, current) {
  const items = [...ol.children];
  jobs.forEach((j, i) => {
    let b = items[i] && items[i].firstChild;
    if (!b) {
      b = el("button", { type: "button" }, el("span", { class: "pn" }), el("span", { class: "badge" }));
      b.addEventListener("click", () => openJob(b.dataset.openJob));
      ol.append(el("li", {}, b));
    }
    setAttr(b, "data-open-job", j.id); setText($(".pn", b), j.name + " (" + j.task_name + ")"); badge($(".badge", b), j.status);
  });
  while (ol.children.length > jobs.length) ol.lastChild.remove();
  markPipe(current, ol);
}
function markPipe(current, ol) {
  for (const b of (ol || $("#detail-pipe")).querySelectorAll("button")) {
    b.classList.toggle("current", b.dataset.openJob === current);
    if (b.dataset.openJob === current) setAttr(b, "aria-current", "step"); else b.removeAttribute("aria-current");
  }
}
function pipeNote(job) {  // a pipeline's jobs are not retried or deleted on their own (the API refuses)
  show($("#detail-pipe-note"), !!job.pipeline_id);
  const name = detailPipeName == null ? "" : " “" + detailPipeName + "”";
  setText(field("pipe-note"), job.pipeline_id ? "Part of pipeline" + name + ": cancel or delete the pipeline, not its jobs." : "");
}
$("#open-pipe").addEventListener("click", () => {
  const job = detailJob;
  if (!job || !job.pipeline_id) return;
  if (matchMedia("(max-width: 980px)").matches) closeDetail();  // the detail covers the page there
  openPipeline(job.pipeline_id, true); selectTab("pipelines");
});
function renderDetail(job) {
  show($("#detail-missing"), false); show($("#detail-body"), true);
  setText(field("name"), job.name); badge(field("status"), job.status); setText(field("task_name"), job.task_name);
  const inPipe = !!job.pipeline_id;
  show($('#detail [data-action="cancel"]'), UNFINISHED.includes(job.status));
  show($('#detail [data-action="retry"]'), (job.status === "FAILED" || job.status === "CANCELLED") && !inPipe);
  show($('#detail [data-action="delete"]'), FINISHED.includes(job.status) && !inPipe);
  pipeNote(job);
  const prog = job.status === "IN_PROGRESS" ? job.progress : null, bar = $(".bar", section("progress"));
  const pct = prog ? Math.round(Math.max(0, Math.min(1, prog.fraction)) * 100) : 0;
  show(section("progress"), job.status === "IN_PROGRESS");
  $("span", bar).style.width = pct + "%"; setAttr(bar, "aria-valuenow", String(pct));
  setText(field("progress"), prog ? pct + "%" + (prog.message ? " · " + prog.message : "") : "running; no progress reported");
  show(section("failure"), !!job.failure_reason && job.status !== "COMPLETED");
  setText(field("failure-title"), job.status === "FAILED" || job.status === "CANCELLED" ? "Failure" : "Last attempt failed");
  setText(field("failure_reason"), job.failure_reason);
  setText(field("failure_traceback"), job.failure_traceback); show(field("failure_traceback"), !!job.failure_traceback);
  const rows = [["ID", job.id], ["Task", job.task_name], ["Description", job.description],
    ["Attempts", job.attempts + " (max retries " + job.max_retries + ")"], ["Priority", job.priority],
    ["Timeout", job.timeout == null ? "none" : job.timeout], ["Created", when(job.created_at)],
    ["Run at", job.run_at && when(job.run_at)], ["Started", job.started_at && when(job.started_at)],
    ["Completed", job.completed_at && when(job.completed_at)], ["Duration", duration(job, " so far")],
    ["Pipeline", job.pipeline_id], ["Next job", job.next_job_id]].filter(r => r[1] != null && r[1] !== "");
  const dl = $("#detail-fields");
  if (dl.children.length !== rows.length * 2) dl.replaceChildren(...rows.flatMap(() => [el("dt"), el("dd")]));
  rows.forEach((r, i) => { setText(dl.children[2 * i], r[0]); setText(dl.children[2 * i + 1], r[1]); });
  setText(field("metadata"), JSON.stringify(job.metadata, null, 2));
}
for (const b of document.querySelectorAll("#detail [data-action]")) b.addEventListener("click", () => act(b.dataset.action, b));
async function act(action, button) {
  const job = detailJob;
  if (!job) return;
  const asks = { cancel: ["Cancel job “" + job.name + "”?" + (job.status === "IN_PROGRESS" ? " Its task is told to stop." : "") +
      (job.next_job_id ? " The jobs after it in its pipeline are cancelled too." : ""), "Cancel job"],
    delete: ["Delete job “" + job.name + "” and its result? This cannot be undone.", "Delete"] };
  if (asks[action] && !(await ask(...asks[action]))) return;
  button.disabled = true;
  try {
    if (action !== "delete") {
      await api("POST", "/jobs/" + enc(job.id) + "/" + action);
      if (action === "retry") notice("Retried job “" + job.name + "”: it is PENDING again.", "info");
    }
    else { await api("DELETE", "/jobs/" + enc(job.id)); closeDetail(); notice("Deleted job “" + job.name + "”.", "info"); }
  } catch (e) { failed(e); } finally { button.disabled = false; }
  quick = 3; refresh();
}
function ask(text, okLabel) {
  const d = $("#confirm");
  if (d.open) return Promise.resolve(false);
  setText($("#confirm-text"), text); setText($("#confirm-ok"), okLabel); d.returnValue = ""; d.showModal();
  return new Promise(resolve => d.addEventListener("close", () => resolve(d.returnValue === "confirm"), { once: true }));
}
$('#confirm [data-action="confirm"]').addEventListener("click", () => $("#confirm").close("confirm"));
$('#confirm [data-action="dismiss"]').addEventListener("click", () => $("#confirm").close("dismiss"));
$("#notice-close").addEventListener("click", () => show($("#notice"), false));
$("#bulk-retry").addEventListener("click", async () => {
  const task = filter.task;
  if (!(await ask("Retry every FAILED job" + (task ? " of task " + task : "") + " that is not in a pipeline?", "Retry them"))) return;
  try {
    const r = await api("POST", "/jobs/retry?" + new URLSearchParams(task ? { status: "FAILED", task_name: task } : { status: "FAILED" }));
    notice("Retried " + r.retried + " failed job" + (r.retried === 1 ? "" : "s") +
      (r.more ? "; more are left (the backlog is full): try again shortly." : "."), "info");
  } catch (e) { failed(e); }
  quick = 3; refresh();
});
// ---------------------------------------------------------- pipelines tab
const pipeRows = new Map();
async function loadPipelines() {
  const cursor = pipesPager.stack[pipesPager.stack.length - 1];
  let data;
  try { data = await api("GET", "/pipelines?limit=" + PAGE + (cursor ? "&cursor=" + enc(cursor) : "")); } catch (e) { failed(e); return; }
  if (cursor !== pipesPager.stack[pipesPager.stack.length - 1]) return;
  syncRows($("#pipes-body"), pipeRows, data.pipelines, p => p.id, id => {
    return clickable(el("tr", { "data-pipeline-id": id, tabindex: "0" }, el("td", {}, el("span"), el("span", { class: "sub" })),
      el("td", {}, el("span", { class: "badge" })), el("td", { class: "num hide-sm" }), el("td", { class: "num" })), () => openPipeline(id, true));
  }, (tr, p) => {
    const done = p.jobs.filter(j => j.status === "COMPLETED").length + " / " + p.jobs.length;
    setText(tr.cells[0].firstChild, p.name); setText($(".sub", tr.cells[0]), done + " done"); setAttr(tr.cells[0], "title", p.name);
    badge($(".badge", tr), p.status); setText(tr.cells[2], done);
    setText(tr.cells[3], rel(p.created_at)); setAttr(tr.cells[3], "title", absTime(p.created_at));
    tr.classList.toggle("selected", p.id === pipeViewId);
    if (p.id === pipeViewId) renderPipeView(p);
  });
  pipesPager.next = data.next_cursor;
  pagerButtons(pipesPager, "#pipes-prev", "#pipes-next");
  show($("#pipes-empty"), data.pipelines.length === 0);
  if (pipeViewId && !data.pipelines.some(p => p.id === pipeViewId)) await loadPipeView();  // on another page
}
function openPipeline(id, scroll) {
  if (!pipeView || pipeView.id !== id) {  // nothing of another pipeline meanwhile, above all not its buttons
    pipeView = null; show($("#pipe-view"), true); setText($("#pipe-name"), "Loading…"); setText($("#pipe-meta"), "");
    badge($("#pipe-status"), ""); show($("#pipe-status"), false); show($("#pipe-actions"), false); $("#pipe-jobs").replaceChildren();
  }
  pipeViewId = id;
  for (const [pid, tr] of pipeRows) tr.classList.toggle("selected", pid === id);
  return loadPipeView().then(() => { if (scroll && pipeViewId === id) $("#pipe-view").scrollIntoView({ block: "nearest" }); });
}
async function loadPipeView() {
  const id = pipeViewId;
  if (!id) return;
  let p;
  try { p = await api("GET", "/pipelines/" + enc(id)); } catch (e) {
    if (id !== pipeViewId) return;
    if (e.status === 404) {
      notice(pipeView ? "Pipeline “" + pipeView.name + "” was deleted." : "No pipeline with this id.", pipeView ? "info" : "error");
      closePipeView();
    } else failed(e);
    return;
  }
  if (id === pipeViewId) renderPipeView(p);
}
function closePipeView() {
  pipeViewId = pipeView = null; show($("#pipe-view"), false);
  for (const tr of pipeRows.values()) tr.classList.remove("selected");
}
function renderPipeView(p) {
  pipeView = p;
  show($("#pipe-view"), true); show($("#pipe-status"), true); show($("#pipe-actions"), true);
  setText($("#pipe-name"), p.name); badge($("#pipe-status"), p.status);
  setText($("#pipe-meta"), "created " + rel(p.created_at) + (p.status === "SCHEDULED" && p.run_at ? " · " + due(p.run_at) : "") +
    (p.duration != null ? " · took " + human(p.duration / 1000) : "") +
    (p.description ? " · " + p.description : ""));
  setAttr($("#pipe-meta"), "title", "created " + absTime(p.created_at) + (p.run_at ? ", runs at " + absTime(p.run_at) : ""));
  show($('#pipe-view [data-action="cancel-pipeline"]'), UNFINISHED.includes(p.status));
  show($('#pipe-view [data-action="delete-pipeline"]'), p.status !== "IN_PROGRESS");
  renderPipeJobs($("#pipe-jobs"), p.jobs, detailId);
}
for (const b of document.querySelectorAll("#pipe-view [data-action]")) b.addEventListener("click", () => actPipeline(b.dataset.action, b));
async function actPipeline(action, button) {
  const p = pipeView;
  if (!p || p.id !== pipeViewId) return;
  const n = p.jobs.length, cancel = action === "cancel-pipeline";
  if (!(await (cancel ? ask("Cancel pipeline “" + p.name + "”? Its current job is cancelled, and with it the jobs after it.", "Cancel pipeline") :
    ask("Delete pipeline “" + p.name + "” with its " + n + " job" + (n === 1 ? "" : "s") + " and their results? This cannot be undone.",
      "Delete pipeline")))) return;
  button.disabled = true;
  try {
    if (cancel) {
      const r = await api("POST", "/pipelines/" + enc(p.id) + "/cancel");
      if (p.id === pipeViewId) renderPipeView(r);
    } else {
      await api("DELETE", "/pipelines/" + enc(p.id));
      if (p.id === pipeViewId) closePipeView();
      if (detailJob && detailJob.pipeline_id === p.id) closeDetail();
      notice("Deleted pipeline “" + p.name + "” and its jobs.", "info");
    }
  } catch (e) { failed(e); } finally { button.disabled = false; }
  quick = 3; refresh();
}
$("#pipes-prev").addEventListener("click", () => turn(pipesPager, false, loadPipelines));
$("#pipes-next").addEventListener("click", () => turn(pipesPager, true, loadPipelines));
// ----------------------------------------------------------- periodic tab
const periodicRows = new Map();
async function loadPeriodic() {
  let data;
  try { data = await api("GET", "/periodic"); } catch (e) { failed(e); return; }
  syncRows($("#periodic-body"), periodicRows, data.periodic, p => p.name,
    id => el("tr", { "data-periodic": id }, el("td", { class: "wrapcell" }, el("span"), el("span", { class: "sub" })), el("td", { class: "hide-sm" }),
      el("td", { class: "mono hide-sm" }), el("td"), el("td")),
    (tr, p) => {
      const c = tr.cells, when = p.cron ? p.cron + " UTC" : "every" + NBSP + p.every + (typeof p.every === "number" ? NBSP + "s" : "");
      setText(c[0].firstChild, p.name); setText($(".sub", c[0]), p.task_name + " · " + when); setText(c[1], p.task_name); setText(c[2], when);
      setText(c[3], rel(p.next_run_at)); setAttr(c[3], "title", absTime(p.next_run_at));
      setText(c[4], "last_fired_at" in p ? (p.last_fired_at ? rel(p.last_fired_at) : "never") : "–"); setAttr(c[4], "title", absTime(p.last_fired_at));
    });
  show($("#periodic-empty"), data.periodic.length === 0);
}
// ------------------------------------------------------------- submit tab
$("#submit-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const f = ev.target, err = $("#submit-error"), meta = f.elements.metadata;
  const fail = msg => { setText(err, msg); show(err, !!msg); };
  let metadata = null;
  if (meta.value.trim()) {
    try { metadata = JSON.parse(meta.value); } catch (e) {
      setAttr(meta, "aria-invalid", "true"); meta.focus();
      return fail("Metadata is not valid JSON: " + e.message);
    }
  }
  meta.removeAttribute("aria-invalid"); fail("");
  const task = f.elements.task_name.value;
  if (!task) return fail("Choose a task.");
  const button = $('button[type="submit"]', f); button.disabled = true;
  try {
    const job = await api("POST", "/jobs", { name: f.elements.name.value.trim() || task, task_name: task, metadata });
    f.elements.name.value = ""; meta.value = "";
    notice("Submitted job “" + job.name + "”.", "info");
    selectTab("jobs"); openJob(job.id); quick = 3; refresh();
  } catch (e) { if (e.status !== 401) fail(e.message); } finally { button.disabled = false; }
});
$("#submit-form").elements.metadata.addEventListener("input", ev => ev.target.removeAttribute("aria-invalid"));
// ------------------------------------------------------------ tabs, polling
function selectTab(name) {
  tab = name;
  for (const b of document.querySelectorAll("[data-tab]")) setAttr(b, "aria-selected", String(b.dataset.tab === name));
  for (const t of ["jobs", "pipelines", "periodic", "submit"]) show($("#tab-" + t), t === name);
  if (name === "pipelines") loadPipelines();
  if (name === "periodic") loadPeriodic();
}
for (const b of document.querySelectorAll("[data-tab]")) b.addEventListener("click", () => selectTab(b.dataset.tab));
let timer = null, running = false, again = false, quick = 0;  // quick: fast polls left after an action
async function refresh() {
  if (running) { again = true; return; }
  running = true; clearTimeout(timer);
  try {
    if (!authOk && !needToken) await loadStatus();  // one request to learn whether a token is needed
    if (!needToken && !document.hidden) {
      const work = [loadStatus(), loadJobs()];
      if (!tasksLoaded) work.push(loadTasks());
      if (detailId) work.push(loadDetail());
      if (tab === "pipelines") work.push(loadPipelines());
      if (tab === "periodic") work.push(loadPeriodic());
      await Promise.all(work);
    }
  } finally { running = false; timer = setTimeout(refresh, again ? 0 : quick > 0 ? (quick--, 400) : POLL_MS); again = false; }
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
show($("#forget-token"), !!token); fromHash(); refresh();
</script>
</body>
</html>
"""
_DASHBOARD = _DASHBOARD_PAGE.encode()
_DASHBOARD_SCRIPT = _DASHBOARD_PAGE.split("<script>")[1].split("</script>")[0]
_DASHBOARD_HEADERS = {  # it may run its own script, and fetch from valet, nothing else
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_DASHBOARD_SCRIPT.encode()).digest()).decode()
        + "'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------- main --

class _JsonFormatter(logging.Formatter):
    """One JSON object a line. A line about a job or a pipeline (whose message starts
    "job %s" or "pipeline %s", as every such line of valet's does) also carries its
    id as a field, job_id or pipeline_id, for a log search to filter on."""

    def format(self, record):
        line = {"time": _rfc3339(record.created), "level": record.levelname,
                "logger": record.name, "thread": record.threadName,
                "message": record.getMessage()}
        if isinstance(record.msg, str) and isinstance(record.args, tuple) and record.args:
            kind = record.msg.partition(" ")[0]
            if kind in ("job", "pipeline") and record.msg.startswith(f"{kind} %s"):
                line[f"{kind}_id"] = record.args[0]
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
    # What would otherwise be printed to stderr goes through the logger too.
    threading.excepthook = lambda args: log.error(
        "thread %s: unexpected error", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers[:] = [handler]


def _stop_on_signals(stopping, received):
    """SIGINT, SIGTERM and SIGHUP set `stopping` (and are appended to `received`); a
    second one while valet stops ends the process at once: the jobs still running
    are settled at the next start, as after a crash."""
    def on_signal(number, _):
        received.append(number)
        if not stopping.is_set():
            stopping.set()
            return
        log.warning("%s received again: stopping at once; jobs still running are "
                    "settled at the next start", signal.Signals(number).name)
        logging.shutdown()
        os._exit(1)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # Windows has no SIGHUP
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)


def _build(config):
    """The Valet that main() runs, or the exit code to end with, its reason said."""
    try:
        return Valet(config)
    except ConfigError as exc:
        print(f"valet: config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        path = (repr(_in_folder(config, config["storage.sqlite.path"]))
                if config["storage.option"] == "sqlite" else
                f"the PostgreSQL database {PostgresStore._where(config['storage.postgres.dsn'])}")
        log.error("cannot open %s: %s%s%s", path, exc.cause,
                  f" ({exc.detail})" if exc.detail else "",
                  "; restore it from a backup (README: Guarantees)"
                  if exc.cause == _CORRUPT else "")
        return 1
    except StoreInUse as exc:
        log.error("%s", exc)
        return 1


def _start(app, config):
    """Start the Valet main() runs: None, or the exit code to end with, its reason
    said (and valet stopped)."""
    try:
        app.start()
        return None
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config["server.host"], config["server.port"],
                  exc.strerror or exc)
        code = 1
    except StorageError as exc:  # recovering the last run's jobs needs writes
        log.error("cannot start: %s", exc)
        code = 1
    except StoreInUse as exc:  # a live node has this node's name
        log.error("%s", exc)
        code = 1
    except ConfigError as exc:  # a worker process could not import the tasks
        print(f"valet: config error: {exc}", file=sys.stderr)
        code = 2
    app.stop()
    return code


def main(argv=None) -> int:
    """Run valet from the command line; return the exit code (2 for a bad config).
    With a client command first (python valet.py jobs), talk to a running valet."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _is_client(argv):
        return _client(argv)
    parser = argparse.ArgumentParser(prog="valet", description=_SERVER_HELP)
    parser.add_argument("--config", help="YAML config file (default: ./config.yaml if present)")
    parser.add_argument("--host", help="listen on this address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen on this port; 0 picks a free one")
    parser.add_argument("--version", action="version", version=f"valet {__version__}")
    args = parser.parse_args(argv)
    path = args.config or ("config.yaml" if os.path.exists("config.yaml") else None)
    overrides = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if os.getcwd() not in sys.path:  # so tasks_module is found where valet runs, too
        sys.path.insert(1, os.getcwd())
    try:
        config = load_config(path, overrides, os.environ)
        config.folder = config.folder or os.getcwd()  # without a file: where it runs
    except ConfigError as exc:  # printed: the log format is part of the config
        print(f"valet: config error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config)
    app = _build(config)
    if isinstance(app, int):
        return app

    stopping, received = threading.Event(), []
    _stop_on_signals(stopping, received)
    failed = _start(app, config)
    if failed:
        return failed
    stopping.wait()
    log.info("%s received: stopping (a second one stops at once)",
             signal.Signals(received[0]).name)
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
