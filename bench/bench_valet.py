#!/usr/bin/env python3
"""Benchmarks for valet: how fast it takes jobs, runs them, and how it holds up
with a large store.

Run it with a Python that has PyYAML (valet needs it), from anywhere:

    .venv/bin/python bench/bench_valet.py             # full run, about 11 minutes
    .venv/bin/python bench/bench_valet.py --quick     # shorter runs, about 4 minutes
    .venv/bin/python bench/bench_valet.py --only submit,idle_latency --rounds 5

(The postgres section takes about 6 minutes of a full run and 2.5 of a quick one.)

Options: --quick, --rounds N, --json PATH (default bench/results.json), --no-wrk
(use the built-in load generator even when wrk is installed), --only NAMES (a
comma list of the sections below) and --against REV (submit also measures
valet.py as it was at a git revision, in the same interleaved rounds: the cost or
gain of a change, as two ratios to one ceiling). The bench starts its own servers
on free ports of 127.0.0.1 and stops every process it started before it exits.

Sections
    ceiling       a bare http.server that parses the JSON body and answers 202: the
                  most any server on this stack (Python's http.server) could do
    submit        POST /jobs per second, memory and SQLite store, while no-op jobs
                  run; and durability: SIGKILL valet under load, then check that
                  every job it acknowledged (202) is in the SQLite file
    end_to_end    N no-op jobs submitted and run: jobs per second until all are done,
                  against the same N POSTs to the bare server by the same submitter
    workers       worker threads against worker processes: N no-op jobs end to end
                  on each store (what a job costs more in a process), and CPU-bound
                  jobs (hash_rounds, ~5 ms each) on 2 workers of each type
    idle_latency  one job at a time on an idle server: POST, then long-poll until
                  COMPLETED; the time that takes
    lateness      jobs scheduled 2 ms apart (run_at): how late each one starts
    scale         a SQLite store with 1,000,000 finished jobs against an empty one:
                  start-up, memory, request latencies; and memory per 100k jobs
    footprint     start-up time and idle memory with a default-like config
    postgres      storage.option: postgres, with 1, 2 and 3 nodes (valet processes on
                  one database): POST /jobs per second, load spread over the nodes,
                  and N jobs end to end, each as a ratio to SQLite measured in the
                  same rounds by the same client; and in every PostgreSQL round the
                  jobs run twice and the jobs not completed (both must be 0). The
                  bench starts its own PostgreSQL server (initdb, pg_ctl; fsync on,
                  as by default) and stops it after; without the server programs or
                  psycopg the section is skipped with a line saying how to add them

Every figure is the median of several rounds (3 by default), and the rounds are
interleaved (ceiling, memory, SQLite, ceiling, ...) so that drift on a noisy
machine hits all alike. Every speed is also given as a ratio to the ceiling
measured in the same run (median over median): a ratio is far less tied to
the machine than a raw number. Two figures are measured once: the time to seed
the large store, and (in --quick) memory_per_100k; their rows say "1 run".
With --only submit, the ceiling is measured too; end_to_end measures its own
(the same submitter against the bare server).

Load generator: HTTP load comes from wrk (https://github.com/wg/wrk) when it is
on the PATH; install it with

    apt-get install wrk       # Debian, Ubuntu
    brew install wrk          # macOS

Otherwise (or with --no-wrk) the bench uses its own generator: 4 processes of
this script, each one keep-alive connection sending POSTs as fast as it can. It
is slower than wrk, so both the ceiling and valet come out lower; the table
header and the JSON say which tool was used. end_to_end and memory_per_100k
always submit with these processes (a fixed number of jobs, not a duration).

Only the standard library is used here (and valet itself, for its SQLite schema),
but for the postgres section, which needs psycopg (pip install "psycopg[binary]")
and PostgreSQL's initdb and pg_ctl (apt-get install postgresql), and is skipped
without them.
"""

import argparse
import calendar
import collections
import contextlib
import datetime
import glob
import http.client
import http.server
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from pathlib import Path


# ---------------------------------------------------------------- constants --

ROOT = Path(__file__).resolve().parent.parent  # the repository root: valet.py, tasks.py
DEFAULT_JSON = ROOT / "bench" / "results.json"
HOST = "127.0.0.1"

SECTIONS = ("ceiling", "submit", "end_to_end", "workers", "idle_latency", "lateness",
            "scale", "footprint", "postgres")

# The no-op job: the task echo returns its metadata.
JOB_BODY = {"name": "bench", "task_name": "echo", "metadata": {"bench": True}}

WORKERS = 4                 # valet's worker threads in every benchmark config
CPU_WORKERS = 2             # workers for the CPU-bound jobs: one per core here
CPU_JOB_MS = 5.0            # what one CPU-bound job takes, on one core, alone
QUEUE_CAPACITY = 10_000_000  # large, so that no POST is refused with 503
LOAD_PROCESSES = 4          # processes of the built-in load generator and submitter
WRK_THREADS = 1             # one wrk thread: on 2 cores, the server keeps one
WRK_CONNECTIONS = 16
DURABILITY_THREADS = 8

START_TIMEOUT = 30.0        # seconds a server may take to answer its first request
STOP_TIMEOUT = 20.0         # seconds a server may take to stop on SIGTERM
RUN_TIMEOUT = 180.0         # seconds any one wait for jobs to finish may take
LOAD_START_DELAY = 0.5      # seconds for the load processes to start before they send
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")

# Sizes and durations of a full run and of a --quick one.
FULL = {
    "rounds": 3,
    "load_seconds": 10,           # each ceiling and submit load
    "durability_seconds": 2.0,    # load before the SIGKILL
    "end_to_end_jobs": 10_000,
    "workers_jobs": 4000,         # no-op jobs per round, each worker type and store
    "cpu_jobs": 400,              # CPU-bound jobs per round (~5 ms each)
    "idle_jobs": 500,
    "lateness_jobs": 1000,
    "lateness_step_ms": 2,
    "lateness_lead": 2.5,         # seconds from the first POST to the first run_at
    "scale_seed_jobs": 1_000_000,
    "scale_requests": 300,        # per kind of request
    "memory_jobs": 100_000,
    "memory_rounds": 3,           # rounds of memory_per_100k
    "footprint_starts": 5,
    "postgres_load_seconds": 10,  # each POST /jobs load of the postgres section
    "postgres_max_requests": 100_000,  # a cap on each of those loads (then it stops)
    "postgres_jobs": 4000,        # jobs end to end, each store and number of nodes
}
QUICK = {
    **FULL,
    "load_seconds": 3,
    "durability_seconds": 1.0,
    "lateness_jobs": 500,         # over 1 s
    "lateness_lead": 1.5,
    "end_to_end_jobs": 3000,
    "workers_jobs": 1500,
    "cpu_jobs": 200,
    "idle_jobs": 200,
    "scale_seed_jobs": 100_000,
    "scale_requests": 150,
    "memory_jobs": 20_000,
    "memory_rounds": 1,           # one is enough for a quick look
    "footprint_starts": 3,
    "postgres_load_seconds": 3,
    "postgres_max_requests": 30_000,
    "postgres_jobs": 1500,
}
WARMUP_JOBS = 5  # jobs sent before a latency measurement, not counted

# The targets: figure key -> (comparison, bound, judged on "value" or "ratio").
TARGETS = {
    "submit.memory.ratio": (">=", 0.6, "ratio"),     # req/s as a fraction of the ceiling
    "submit.sqlite.ratio": (">=", 0.5, "ratio"),
    "submit.durability.lost": ("==", 0, "value"),
    "end_to_end.sqlite.ratio": (">=", 0.4, "ratio"),
    "workers.cpu.ratio": (">=", 1.7, "value"),       # processes' jobs/s over threads'
    "idle_latency.memory.p50": ("<", 2.0, "value"),  # ms
    "idle_latency.memory.p99": ("<", 10.0, "value"),
    "idle_latency.sqlite.p50": ("<", 2.0, "value"),
    "idle_latency.sqlite.p99": ("<", 10.0, "value"),
    "lateness.memory.p99": ("<", 5.0, "value"),      # ms
    "lateness.sqlite.p99": ("<", 5.0, "value"),
    "scale.ratio": ("<", 1.5, "value"),              # every seeded/empty latency ratio
    "scale.startup": ("<", 2.0, "value"),            # start-up on the seeded store, s
    "postgres.run_twice": ("==", 0, "value"),        # jobs, over a node count's rounds
    "postgres.not_completed": ("==", 0, "value"),
}


# ------------------------------------------------------------------ helpers --

_T0 = time.monotonic()


def progress(message):
    """A progress line on stderr, with the seconds since the bench started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q):
    """The q-th percentile (0 to 100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def free_port():
    """A TCP port free on HOST right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_mib(pid):
    """Resident memory of a process in MiB (VmRSS), or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rfc3339_ms(epoch_ms):
    """An RFC 3339 UTC time from whole epoch milliseconds: 2026-11-28T12:00:00.123Z."""
    seconds, millis = divmod(epoch_ms, 1000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                      r"(?:[Zz]|([+-])(\d\d):(\d\d))?")


def parse_time(text):
    """Epoch seconds from an RFC 3339 time (any number of fraction digits; Z or ±hh:mm)."""
    found = _RFC3339.fullmatch(text)
    if not found:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    fraction = found.group(7) or ""
    seconds = calendar.timegm((year, month, day, hour, minute, second))
    if found.group(8):
        offset = int(found.group(9)) * 3600 + int(found.group(10)) * 60
        seconds -= offset if found.group(8) == "+" else -offset
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def fraction_digits(text):
    """How many fraction-of-second digits an RFC 3339 time has."""
    found = _RFC3339.fullmatch(text or "")
    return len(found.group(7) or "") if found else 0


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


# ------------------------------------------------------- child processes --
#
# Every process the bench starts goes through spawn() and is ended by stop_child()
# (or kill_children() on the way out), so none outlives the bench.

_CHILDREN = []


def spawn(args, **kwargs):
    proc = subprocess.Popen(args, **kwargs)
    _CHILDREN.append(proc)
    return proc


def stop_child(proc, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
    """End a child: send sig, wait up to timeout seconds, then SIGKILL; reap it.
    It is forgotten only once it is gone, so an interrupted stop leaves it to
    kill_children()."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def kill_children():
    for proc in list(_CHILDREN):
        stop_child(proc, signal.SIGKILL, 5)


def run_child(args, timeout):
    """Run a child to its end (at most timeout seconds); its stdout as text."""
    proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{Path(args[0]).name} ran longer than {timeout:.0f}s") from None
    finally:
        stop_child(proc, signal.SIGKILL, 5)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited with {proc.returncode}: "
                           f"{err.strip()[-300:]}")
    return out


# -------------------------------------------------------------- HTTP client --

class Client:
    """One keep-alive HTTP connection to a server, for JSON requests."""

    def __init__(self, url, timeout=30.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None):
        """(status, parsed JSON body or None). A failed connection is closed, so the
        next request opens a new one."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        return response.status, (json.loads(data) if data else None)

    def get(self, path):
        """The JSON of a GET that must answer 200."""
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def submit(self, body=JOB_BODY):
        """POST /jobs; the job's JSON. Anything but 202 is an error."""
        status, job = self.request("POST", "/jobs", body)
        if status != 202:
            raise RuntimeError(f"POST /jobs: {status} {job}")
        return job

    def wait_finished(self, job_id, timeout):
        """The job's JSON once it is finished (COMPLETED, FAILED or CANCELLED), by
        long-polling GET /jobs/{id}?wait=."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s")
            job = self.get(f"/jobs/{job_id}?wait={max(1, min(60, int(left)))}")
            if job["status"] in FINISHED:
                return job

    def list_jobs(self, status=None, max_jobs=10_000_000):
        """Every job (of a status), following next_cursor, 1000 a page."""
        jobs, cursor = [], None
        while len(jobs) < max_jobs:
            query = {"limit": 1000}
            if status:
                query["status"] = status
            if cursor:
                query["cursor"] = cursor
            page = self.get("/jobs?" + urllib.parse.urlencode(query))
            jobs.extend(page["jobs"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def wait_idle(self, timeout, interval=0.002):
        """Poll /status until the queue is empty and no worker is busy; the
        time.time() at which the answer saying so arrived."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get("/status")
            now = time.time()
            if status["queue"]["depth"] == 0 and status["workers"]["busy"] == 0:
                return now
            if time.monotonic() > deadline:
                raise TimeoutError(f"valet still busy after {timeout:.0f}s: {status}")
            time.sleep(interval)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def timed(fn):
    """(seconds fn() took, its result)."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# ---------------------------------------------------------- load generators --
#
# load(url, body, seconds) sends POST /jobs with one body for a number of seconds,
# as hard as the tool can, and returns {"rps", "p50_ms", "p99_ms", "errors",
# "requests", "tool"}: requests per second, latency percentiles, responses
# other than 2xx plus socket errors, and requests answered.

def load(url, body, seconds, use_wrk):
    if use_wrk:
        return wrk_load(url, body, seconds)
    return python_load(url, body, seconds)


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text, label):
    found = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    return float(found.group(1)) * _WRK_UNITS[found.group(2)] if found else None


def parse_wrk(text):
    """The figures of a wrk --latency report."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                        r"timeout (\d+)", text)
    if not rps or not requests:
        raise RuntimeError(f"cannot read wrk's report: {text[-300:]!r}")
    socket_errors = sum(int(n) for n in sockets.groups()) if sockets else 0
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _wrk_ms(text, "50%"),
        "p99_ms": _wrk_ms(text, "99%"),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0) + socket_errors,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors,
        "requests": int(requests.group(1)),
        "tool": "wrk",
    }


def wrk_load(url, body, seconds):
    """Load with wrk: WRK_THREADS threads, WRK_CONNECTIONS keep-alive connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\n'
                     f"wrk.body = [==[{json.dumps(body)}]==]\n"
                     'wrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = run_child([shutil.which("wrk"), f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}",
                         f"-d{seconds}s", "--latency", "-s", script.name, f"{url}/jobs"],
                        timeout=seconds + 30)
    finally:
        os.unlink(script.name)
    return parse_wrk(out)


def _worker_args(url, body, seconds=0, count=0, start_at=0.0, deadline=0.0):
    return [sys.executable, str(Path(__file__).resolve()), "--load-worker",
            "--url", url, "--body", json.dumps(body), "--seconds", str(seconds),
            "--count", str(count), "--start-at", repr(start_at), "--deadline", repr(deadline)]


def _run_workers(arg_lists, timeout):
    """Start the load processes, wait for all, and return their parsed reports."""
    procs = [spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in arg_lists]
    reports = []
    try:
        end = time.monotonic() + timeout
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"a load process ran longer than {timeout:.0f}s") from None
            if proc.returncode != 0:
                raise RuntimeError(f"a load process failed ({proc.returncode}): "
                                   f"{err.strip()[-300:]}")
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            stop_child(proc, signal.SIGKILL, 5)
    return reports


def python_load(url, body, seconds, count=0):
    """Load with LOAD_PROCESSES processes of this script, one keep-alive connection
    each; req/s = all 2xx answers / the wall time from the first send to the last
    answer. url may be a list: process i sends to url[i % len(url)]. With count,
    the processes stop after that many 2xx between them (count/P each)."""
    urls = [url] if isinstance(url, str) else list(url)
    start_at = time.time() + LOAD_START_DELAY
    share = -(-count // LOAD_PROCESSES) if count else 0
    reports = _run_workers(
        [_worker_args(urls[i % len(urls)], body, seconds=seconds, count=share,
                      start_at=start_at, deadline=start_at + seconds + 30)
         for i in range(LOAD_PROCESSES)],
        timeout=LOAD_START_DELAY + seconds + 60)
    latencies = [ms for report in reports for ms in report["latencies_ms"]]
    ok = sum(report["ok"] for report in reports)
    window = max(r["last"] for r in reports) - min(r["first"] for r in reports)
    return {
        "rps": ok / window if window > 0 else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": sum(report["errors"] for report in reports),
        "requests": ok,
        "tool": "python",
    }


def python_submit(url, body, count, timeout=RUN_TIMEOUT):
    """Submit `count` jobs from LOAD_PROCESSES processes (count/P each, keep-alive,
    as fast as each can); {"ok", "errors", "first", "last"}: 202s, failures, and the
    wall times of the first POST and of the last answer. url may be a list: process
    i sends to url[i % len(url)]."""
    urls = [url] if isinstance(url, str) else list(url)
    shares = [count // LOAD_PROCESSES + (1 if i < count % LOAD_PROCESSES else 0)
              for i in range(LOAD_PROCESSES)]
    start_at = time.time() + LOAD_START_DELAY
    reports = _run_workers(
        [_worker_args(urls[i % len(urls)], body, count=share, start_at=start_at,
                      deadline=start_at + timeout) for i, share in enumerate(shares) if share],
        timeout=LOAD_START_DELAY + timeout + 30)
    return {
        "ok": sum(r["ok"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "first": min(r["first"] for r in reports),
        "last": max(r["last"] for r in reports),
    }


def load_worker_main(args):
    """Hidden mode (--load-worker): one keep-alive connection sending POSTs, from
    start_at, for `seconds` or until `count` got a 2xx (never past `deadline`).
    Prints a JSON report on stdout."""
    parts = urllib.parse.urlsplit(args.url)
    payload = args.body.encode()
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.connect()  # before start_at: the connection is not part of the measurement
    time.sleep(max(0.0, args.start_at - time.time()))
    stop_at = args.start_at + args.seconds if args.seconds else args.deadline
    stop_at = min(stop_at, args.deadline)
    latencies, statuses = [], collections.Counter()
    ok = errors = 0
    first = time.time()
    last = first
    while time.time() < stop_at and (not args.count or ok < args.count):
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/jobs", body=payload, headers=headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            statuses["socket error"] += 1
            conn.close()  # http.client reconnects on the next request
            time.sleep(0.01)
            continue
        latencies.append((time.perf_counter() - t0) * 1000)
        last = time.time()
        statuses[str(response.status)] += 1
        if 200 <= response.status < 300:
            ok += 1
        else:
            errors += 1
    conn.close()
    json.dump({"ok": ok, "errors": errors, "statuses": statuses, "first": first,
               "last": last, "latencies_ms": latencies if args.seconds else []},
              sys.stdout)
    return 0


# ------------------------------------------------------------------ servers --

class _CeilingHandler(http.server.BaseHTTPRequestHandler):
    """Does what any JSON API must do for a POST: read and parse the body, answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        json.loads(body)
        data = json.dumps({"id": uuid.uuid4().hex, "status": "PENDING"}).encode()
        self.wfile.write(b"HTTP/1.1 202 Accepted\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)

    def log_message(self, format, *args):
        pass


class _CeilingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def ceiling_server_main(port):
    """Hidden mode (--ceiling-server PORT): serve until killed, or until the bench
    that started it is gone."""
    parent = os.getppid()

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    with _CeilingServer((HOST, port), _CeilingHandler) as server:
        server.serve_forever()
    return 0


def _wait_answering(proc, url, path, timeout, log_path=None):
    """Wait until GET/POST `path` answers; raise if the process dies or time runs out."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = ""
            if log_path and Path(log_path).exists():
                tail = Path(log_path).read_text(errors="replace")[-500:]
            raise RuntimeError(f"server exited with {proc.returncode} before answering; "
                               f"log: {tail!r}")
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        try:
            if path == "/status":
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=json.dumps(JOB_BODY),
                             headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status < 300:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not answering after {timeout:.0f}s")
        time.sleep(0.005)


class CeilingServer:
    """The ceiling server in a child process (a context manager)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc = None

    def __enter__(self):
        self.proc = spawn([sys.executable, str(Path(__file__).resolve()),
                           "--ceiling-server", str(self.port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_answering(self.proc, self.url, "/jobs", START_TIMEOUT)
        return self

    def __exit__(self, *exc):
        stop_child(self.proc, signal.SIGKILL, 5)


class ValetServer:
    """A valet process on a free port with its own config in `workdir` (a context
    manager: __enter__ starts it and waits until /status answers; __exit__ stops it
    with SIGTERM, SIGKILL if it takes too long).

    store is "memory", "sqlite" or "postgres"; db_path the SQLite file (default: a new
    file in workdir); postgres the storage.postgres keys ({"dsn", "schema"}).
    tasks_module names the tasks; with tasks_source, that module is this text,
    written beside the config (where valet looks for it first). startup is the
    seconds from Popen to the first 200 from /status.
    """

    _count = 0

    def __init__(self, workdir, store="sqlite", db_path=None, queue_capacity=QUEUE_CAPACITY,
                 root=ROOT, worker_type="thread", workers=WORKERS, postgres=None,
                 tasks_module="tasks", tasks_source=None):
        ValetServer._count += 1
        self.root = Path(root)  # the folder of the valet.py and tasks.py to run
        self.dir = Path(workdir) / f"valet-{ValetServer._count}"
        self.dir.mkdir(parents=True)
        self.db_path = Path(db_path) if db_path else self.dir / "valet.db"
        self.log_path = self.dir / "valet.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.store = store
        self.queue_capacity = queue_capacity
        self.worker_type = worker_type
        self.workers = workers
        self.postgres = postgres
        self.tasks_module = tasks_module
        if tasks_source is not None:
            (self.dir / f"{tasks_module}.py").write_text(tasks_source)
        self.proc = None
        self.startup = None

    def config(self):
        return {
            "server": {"host": HOST, "port": self.port},
            "worker_pool": {"workers": self.workers, "queue_capacity": self.queue_capacity,
                            "shutdown_grace": 10,
                            **({} if self.worker_type == "thread" else
                               {"worker_type": self.worker_type})},
            "storage": {"option": self.store,
                        "sqlite": {"path": str(self.db_path), "synchronous": "full"},
                        **({"postgres": self.postgres} if self.postgres else {})},
            "tasks_module": self.tasks_module,
            "logging_level": "info",
        }

    def __enter__(self):
        config_path = self.dir / "config.yaml"
        config_path.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        with open(self.log_path, "wb") as log_file:
            t0 = time.perf_counter()
            self.proc = spawn([sys.executable, str(self.root / "valet.py"), "--config",
                               str(config_path), "--port", str(self.port)],
                              cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_answering(self.proc, self.url, "/status", START_TIMEOUT, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup = time.perf_counter() - t0
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def kill(self):
        """SIGKILL: no chance to clean up."""
        stop_child(self.proc, signal.SIGKILL, 5)

    def rss_mib(self):
        return rss_mib(self.proc.pid)

    def log_count(self, word):
        """How many lines of its log contain `word` (e.g. ERROR, Traceback)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return sum(word in line for line in f)
        except OSError:
            return 0


# ------------------------------------------------------------- measurements --
#
# Each measurement is one function taking the Bench context and returning
# (raw data for the JSON, rows for the table). A row is made by row().

class Bench:
    """What every measurement needs: settings, work dir, load tool, the ceiling."""

    def __init__(self, settings, workdir, use_wrk):
        self.s = settings
        self.workdir = workdir
        self.use_wrk = use_wrk
        self.ceiling_rps = None  # the median ceiling req/s, once measured
        self.against = None      # (git revision, folder of its valet.py), with --against
        self.notes = []          # odd things seen, printed under the table

    def ratio(self, rps):
        if rps is None or not self.ceiling_rps:
            return None
        return rps / self.ceiling_rps


def row(section, what, value, unit="", ratio=None, target_key=None, note=""):
    """One line of the table, judged against TARGETS[target_key] if given."""
    target, verdict = "", ""
    if target_key in TARGETS:
        op, bound, on = TARGETS[target_key]
        judged = ratio if on == "ratio" else value
        target = f"{op} {bound:g}" + (" × ceiling" if on == "ratio" else "")
        if judged is None:
            verdict = "n/a"
        elif {">=": judged >= bound, "<": judged < bound, "==": judged == bound}[op]:
            verdict = "ok"
        else:
            verdict = "MISSED"
    return {"section": section, "what": what, "value": value, "unit": unit, "ratio": ratio,
            "target": target, "verdict": verdict, "note": note}


def error_row(section, exc):
    return {"section": section, "what": "ERROR", "value": None, "unit": "", "ratio": None,
            "target": "", "verdict": "ERROR", "note": f"{type(exc).__name__}: {exc}"}


def _round_error(section, label, exc, rounds):
    progress(f"{section}: {label} failed: {type(exc).__name__}: {exc}")
    rounds.append({"target": label, "error": f"{type(exc).__name__}: {exc}"})


def _figures(rounds, label):
    return [r for r in rounds if r.get("target") == label and "error" not in r]


def interleave(bench, section, targets, run_round, what=""):
    """The rounds of a measurement: run_round(target, i) for every target in turn,
    bench.s["rounds"] times (a, b, c, a, b, c, ...), so that drift on the machine
    hits every target alike. A round that raises is kept as an error."""
    rounds = []
    for i in range(bench.s["rounds"]):
        for target in targets:
            progress(f"{section}: round {i + 1}/{bench.s['rounds']}: {target}{what}")
            try:
                result = run_round(target, i)
            except Exception as exc:
                _round_error(section, target, exc, rounds)
                continue
            rounds.append({"target": target, "round": i + 1, **result})
    return rounds


def _errors_note(runs):
    errors = sum(r.get("errors", 0) for r in runs)
    failed = sum(1 for r in runs if "error" in r)
    parts = []
    if errors:
        parts.append(f"! {errors} non-2xx/socket errors")
    if failed:
        parts.append(f"! {failed} round(s) failed")
    return "; ".join(parts)


# -- 1 and 2: ceiling and submit

def _ceiling_round(bench):
    with CeilingServer() as server:
        return load(server.url, JOB_BODY, bench.s["load_seconds"], bench.use_wrk)


def _submit_round(bench, target):
    store, _, revision = target.partition(" at ")  # "sqlite at 3f2a1b0": --against's
    root = bench.against[1] if revision else ROOT
    with ValetServer(bench.workdir, store, root=root) as server:
        result = load(server.url, JOB_BODY, bench.s["load_seconds"], bench.use_wrk)
        status = Client(server.url).get("/status")
        result["final_queue_depth"] = status["queue"]["depth"]
        result["log_errors"] = server.log_count(" ERROR ")
    return result


def measure_ceiling_and_submit(bench, with_submit):
    """ceiling: POST req/s, p50 and p99 of the bare http.server (the most this stack
    could do). submit: the same load against POST /jobs of valet with the memory
    store and with SQLite (synchronous full: each 202 has been fsynced), while
    WORKERS threads run the no-op jobs; the queue depth left at the end is noted
    (jobs accepted but not yet run). Rounds interleave ceiling, memory, sqlite (and,
    with --against REV, memory and sqlite at REV)."""
    stores = ["memory", "sqlite"]
    if bench.against is not None:
        stores += [f"{store} at {bench.against[0]}" for store in ("memory", "sqlite")]
    targets = ["ceiling"] + (stores if with_submit else [])
    rounds = interleave(
        bench, "submit" if with_submit else "ceiling", targets,
        lambda target, i: (_ceiling_round(bench) if target == "ceiling"
                           else _submit_round(bench, target)),
        f" ({bench.s['load_seconds']}s load)")

    data = {"rounds": rounds, "medians": {}}
    rows = []
    for target in targets:
        runs = _figures(rounds, target)
        failed = [r for r in rounds if r.get("target") == target and "error" in r]
        med = {key: median([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms")}
        data["medians"][target] = med
        if target == "ceiling":
            bench.ceiling_rps = med["rps"]
        section = "ceiling" if target == "ceiling" else "submit"
        name = "bare http.server" if target == "ceiling" else f"POST /jobs, {target}"
        note = _errors_note(runs + failed)
        if target != "ceiling":
            depth = [r["final_queue_depth"] for r in runs]
            note = "; ".join(filter(None, [note, f"queue left: {depth}"]))
        rows.append(row(section, f"{name}: req/s", med["rps"], "req/s", bench.ratio(med["rps"]),
                        f"submit.{target}.ratio", note))
        rows.append(row(section, f"{name}: p50", med["p50_ms"], "ms"))
        rows.append(row(section, f"{name}: p99", med["p99_ms"], "ms"))
    if with_submit:
        try:
            durability = measure_durability(bench)
            data["durability"] = durability
            rows.append(row("submit", "durability: acked before SIGKILL", durability["acked"],
                            "jobs"))
            rows.append(row("submit", "durability: acked but lost", durability["lost"],
                            "jobs", target_key="submit.durability.lost"))
        except Exception as exc:
            progress(f"submit: durability failed: {exc}")
            data["durability"] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(error_row("submit", exc))
    return data, rows


def measure_durability(bench):
    """SQLite store: DURABILITY_THREADS threads POST jobs on keep-alive connections
    and record each id answered 202; valet is SIGKILLed mid-load; then every
    recorded id must be in the jobs table of the file. A request in flight at the
    kill that got no answer was never acknowledged, so it does not count."""
    progress(f"submit: durability (SIGKILL after {bench.s['durability_seconds']}s of load)")
    acked, lock, stop = [], threading.Lock(), threading.Event()
    answers = collections.Counter()

    def client_loop(url):
        client = Client(url, timeout=10)
        while not stop.is_set():
            try:
                status, job = client.request("POST", "/jobs", JOB_BODY)
            except (OSError, http.client.HTTPException, ValueError):
                break  # the server is gone
            with lock:
                answers[status] += 1
                if status == 202:
                    acked.append(job["id"])
        client.close()

    with ValetServer(bench.workdir, "sqlite") as server:
        threads = [threading.Thread(target=client_loop, args=(server.url,), daemon=True)
                   for _ in range(DURABILITY_THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(bench.s["durability_seconds"])
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(15)
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError("a durability client did not stop")
        with lock:
            acked_ids = list(acked)
        conn = sqlite3.connect(server.db_path)
        try:
            stored = {job_id for (job_id,) in conn.execute("SELECT id FROM jobs")}
        finally:
            conn.close()
    lost = [job_id for job_id in acked_ids if job_id not in stored]
    return {"acked": len(acked_ids), "lost": len(lost), "stored": len(stored),
            "lost_ids": lost[:20], "answers": {str(k): v for k, v in answers.items()}}


# -- 3: end to end

def _end_to_end_round(bench, target, count):
    if target == "ceiling":  # the same submitter against the bare server: its ceiling
        with CeilingServer() as server:
            submitted = python_submit(server.url, JOB_BODY, count)
        elapsed = submitted["last"] - submitted["first"]
        return {"jobs_per_s": count / elapsed, "seconds": elapsed, "completed": count,
                "submitted": submitted["ok"], "errors": submitted["errors"]}
    with ValetServer(bench.workdir, target) as server:
        submitted = python_submit(server.url, JOB_BODY, count)
        client = Client(server.url)
        done_at = client.wait_idle(RUN_TIMEOUT)
        elapsed = done_at - submitted["first"]
        completed = len(client.list_jobs("COMPLETED"))
        client.close()
        log_errors = server.log_count(" ERROR ")
    return {"jobs_per_s": count / elapsed, "seconds": elapsed, "submitted": submitted["ok"],
            "errors": submitted["errors"], "completed": completed,
            "submit_seconds": submitted["last"] - submitted["first"], "log_errors": log_errors}


def measure_end_to_end(bench):
    """N no-op jobs submitted by LOAD_PROCESSES processes (N/P each, keep-alive, as
    fast as each can) to a fresh valet; the time from the first POST until /status
    shows an empty queue and no busy worker (polled every ~2 ms once every client
    has finished submitting). jobs/s = N / that time. Afterwards (not timed) every
    job must be listed as COMPLETED. Its ceiling is the same N POSTs, by the same
    submitter, to the bare server: the submitter's processes share the machine's
    cores with the server, so wrk's ceiling would not be a fair measure here."""
    count = bench.s["end_to_end_jobs"]
    targets = ("ceiling", "memory", "sqlite")
    rounds = interleave(bench, "end_to_end", targets,
                        lambda target, i: _end_to_end_round(bench, target, count),
                        f" ({count} jobs)")
    data, rows = {"jobs": count, "rounds": rounds, "medians": {}}, []
    ceiling = None
    for target in targets:
        runs = _figures(rounds, target)
        failed = [r for r in rounds if r.get("target") == target and "error" in r]
        rate = median([r["jobs_per_s"] for r in runs])
        seconds = median([r["seconds"] for r in runs])
        if target == "ceiling":
            ceiling = rate
        ratio = rate / ceiling if rate is not None and ceiling else None
        data["medians"][target] = {"jobs_per_s": rate, "seconds": seconds, "ratio": ratio}
        short = [r["completed"] for r in runs if r["completed"] != count]
        note = "; ".join(filter(None, [
            _errors_note(runs + failed),
            f"! only {short} of {count} COMPLETED" if short else ""]))
        if target == "ceiling":
            rows.append(row("end_to_end", f"{count:,} POSTs to bare http.server: req/s", rate,
                            "req/s", 1.0 if rate else None, note=note or "same submitter"))
            continue
        rows.append(row("end_to_end", f"{count:,} jobs, {target}: jobs/s", rate, "jobs/s",
                        ratio, f"end_to_end.{target}.ratio", note))
        rows.append(row("end_to_end", f"{count:,} jobs, {target}: time", seconds, "s"))
    return data, rows


# -- 4: worker threads against worker processes

def _workers_round(bench, target, count, body, workers):
    kind, store = target.split(" ", 1)  # "thread memory", "process cpu", ...
    with ValetServer(bench.workdir, "memory" if store == "cpu" else store,
                     worker_type=kind, workers=workers) as server:
        submitted = python_submit(server.url, body, count)
        client = Client(server.url)
        done_at = client.wait_idle(RUN_TIMEOUT)
        completed = len(client.list_jobs("COMPLETED"))
        client.close()
        log_errors = server.log_count(" ERROR ")
    elapsed = done_at - submitted["first"]
    return {"jobs_per_s": count / elapsed, "seconds": elapsed, "submitted": submitted["ok"],
            "errors": submitted["errors"], "completed": completed, "log_errors": log_errors}


def hash_rounds_for(ms):
    """How many rounds of tasks.hash_rounds take `ms` milliseconds here (alone)."""
    sys.path.insert(0, str(ROOT))
    import tasks  # noqa: E402
    rounds, took = 1000, 0.0
    while took < 0.05:  # long enough to time
        rounds *= 2
        t0 = time.perf_counter()
        tasks.hash_rounds({"rounds": rounds})
        took = time.perf_counter() - t0
    return max(1, round(rounds * ms / 1000 / took))


def measure_workers(bench):
    """Worker threads against worker processes (4 each), on N no-op jobs end to end
    (as end_to_end measures it) on each store: what running a job in another
    process costs, per job. And M CPU-bound jobs (hash_rounds, calibrated to
    ~5 ms alone on one core) on 2 workers of each type: threads share one core
    (the GIL), processes get one each. ratio: processes' jobs/s over threads'."""
    count, cpu_count = bench.s["workers_jobs"], bench.s["cpu_jobs"]
    rounds_5ms = hash_rounds_for(CPU_JOB_MS)
    cpu_body = {"name": "bench", "task_name": "hash_rounds",
                "metadata": {"text": "bench", "rounds": rounds_5ms}}
    noop = ("thread memory", "process memory", "thread sqlite", "process sqlite")
    cpu = ("thread cpu", "process cpu")

    def run_round(target, i):
        if target in cpu:
            return _workers_round(bench, target, cpu_count, cpu_body, CPU_WORKERS)
        return _workers_round(bench, target, count, JOB_BODY, WORKERS)

    rounds = interleave(bench, "workers", noop + cpu, run_round)
    data = {"jobs": count, "cpu_jobs": cpu_count, "hash_rounds": rounds_5ms,
            "rounds": rounds, "medians": {}}
    rows = []
    rates = {}
    for target in noop + cpu:
        runs = _figures(rounds, target)
        failed = [r for r in rounds if r.get("target") == target and "error" in r]
        rates[target] = median([r["jobs_per_s"] for r in runs])
        data["medians"][target] = {"jobs_per_s": rates[target]}
        short = [r["completed"] for r in runs
                 if r["completed"] != (cpu_count if target in cpu else count)]
        note = "; ".join(filter(None, [_errors_note(runs + failed),
                                       f"! only {short} COMPLETED" if short else ""]))
        kind, store = target.split(" ", 1)
        kind = {"thread": "threads", "process": "processes"}[kind]
        what = (f"{cpu_count} CPU-bound jobs (~{CPU_JOB_MS:g} ms), {CPU_WORKERS} {kind}"
                if store == "cpu" else f"{count:,} no-op jobs, {store}, {WORKERS} {kind}")
        rows.append(row("workers", f"{what}: jobs/s", rates[target], "jobs/s", note=note))
    for store in ("memory", "sqlite", "cpu"):
        thread, process = rates[f"thread {store}"], rates[f"process {store}"]
        if not (thread and process):
            continue
        data["medians"][f"processes/threads {store}"] = process / thread
        what = "CPU-bound" if store == "cpu" else f"no-op, {store}"
        rows.append(row("workers", f"{what}: processes' jobs/s over threads'",
                        process / thread, "×",
                        target_key="workers.cpu.ratio" if store == "cpu" else None))
        if store != "cpu":
            extra = (1 / process - 1 / thread) * 1e6
            data["medians"][f"overhead {store}"] = {"us_per_job": extra}
            rows.append(row("workers", f"no-op, {store}: a job in a process costs more",
                            extra, "µs/job", note="end to end, from the jobs/s above"))
    return data, rows


# -- 5: idle latency

def _idle_round(bench, store, count):
    with ValetServer(bench.workdir, store) as server:
        client = Client(server.url)
        latencies = []
        for i in range(WARMUP_JOBS + count):
            t0 = time.perf_counter()
            job = client.submit()
            job = client.wait_finished(job["id"], timeout=30)
            elapsed = (time.perf_counter() - t0) * 1000
            if job["status"] != "COMPLETED":
                raise RuntimeError(f"job {job['id']} ended {job['status']}")
            if i >= WARMUP_JOBS:
                latencies.append(elapsed)
        client.close()
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies)}


def measure_idle_latency(bench):
    """On a fresh, idle valet, one keep-alive connection: for each of K jobs, the
    time from sending POST /jobs to the answer of GET /jobs/{id}?wait=5 saying
    COMPLETED (repeated until it does). What one client waiting for one job sees."""
    count = bench.s["idle_jobs"]
    rounds = interleave(bench, "idle_latency", ("memory", "sqlite"),
                        lambda store, i: _idle_round(bench, store, count), f" ({count} jobs)")
    data, rows = {"jobs": count, "rounds": rounds, "medians": {}}, []
    for store in ("memory", "sqlite"):
        runs = _figures(rounds, store)
        med = {key: median([r[key] for r in runs]) for key in ("p50_ms", "p99_ms", "max_ms")}
        data["medians"][store] = med
        note = _errors_note([r for r in rounds if r.get("target") == store])
        rows.append(row("idle_latency", f"POST to COMPLETED, {store}: p50", med["p50_ms"], "ms",
                        target_key=f"idle_latency.{store}.p50", note=note))
        rows.append(row("idle_latency", f"POST to COMPLETED, {store}: p99", med["p99_ms"], "ms",
                        target_key=f"idle_latency.{store}.p99"))
        rows.append(row("idle_latency", f"POST to COMPLETED, {store}: max", med["max_ms"], "ms"))
    return data, rows


# -- 6: lateness

def _lateness_round(bench, store):
    count, step = bench.s["lateness_jobs"], bench.s["lateness_step_ms"]
    with ValetServer(bench.workdir, store) as server:
        first_due_ms = math.ceil((time.time() + bench.s["lateness_lead"]) * 1000)
        bodies = [{"name": f"late-{i}", "task_name": "echo", "metadata": {"i": i},
                   "run_at": rfc3339_ms(first_due_ms + i * step)} for i in range(count)]
        ids = [None] * count
        failures = []

        def submitter(offset):
            client = Client(server.url)
            try:
                for i in range(offset, count, LOAD_PROCESSES):
                    ids[i] = client.submit(bodies[i])["id"]
            except Exception as exc:
                failures.append(exc)
            client.close()

        threads = [threading.Thread(target=submitter, args=(k,), daemon=True)
                   for k in range(LOAD_PROCESSES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        submitted_at = time.time()
        if failures or any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"submitting failed: {failures[:1] or 'timed out'}")
        early_by = first_due_ms / 1000 - submitted_at  # > 0: all in before the first was due

        client = Client(server.url)
        last_due = (first_due_ms + (count - 1) * step) / 1000
        client.wait_finished(ids[-1], timeout=max(0.0, last_due - time.time()) + 60)
        wanted = set(ids)
        deadline = time.monotonic() + 60
        while True:
            jobs = [job for job in client.list_jobs("COMPLETED") if job["id"] in wanted]
            if len(jobs) == count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        client.close()
    if len(jobs) != count:
        raise RuntimeError(f"only {len(jobs)} of {count} jobs COMPLETED")
    lateness = [round((parse_time(job["started_at"]) - parse_time(job["run_at"])) * 1000, 3)
                for job in jobs]
    digits = max(fraction_digits(job["started_at"]) for job in jobs)
    return {"p50_ms": percentile(lateness, 50), "p99_ms": percentile(lateness, 99),
            "max_ms": max(lateness), "min_ms": min(lateness),
            "submitted_before_due": early_by > 0, "submitted_early_by_s": early_by,
            "time_digits": digits}


def measure_lateness(bench):
    """Jobs with run_at = T0 + i × 2 ms (all submitted, by 4 keep-alive connections,
    before T0), on a fresh valet; lateness = started_at − run_at of each job, as
    its JSON gives them. The API's times have the resolution they have (printed):
    started_at is cut to it, so a lateness is off by up to that much."""
    rounds = interleave(
        bench, "lateness", ("memory", "sqlite"), lambda store, i: _lateness_round(bench, store),
        f" ({bench.s['lateness_jobs']} jobs, {bench.s['lateness_step_ms']} ms apart)")
    data, rows = {"jobs": bench.s["lateness_jobs"], "rounds": rounds, "medians": {}}, []
    for store in ("memory", "sqlite"):
        runs = _figures(rounds, store)
        med = {key: median([r[key] for r in runs]) for key in ("p50_ms", "p99_ms", "max_ms")}
        data["medians"][store] = med
        notes = [_errors_note([r for r in rounds if r.get("target") == store])]
        late_submits = [r for r in runs if not r["submitted_before_due"]]
        if late_submits:
            notes.append(f"! {len(late_submits)} round(s) not all submitted before T0")
        digits = {r["time_digits"] for r in runs}
        if digits:
            notes.append(f"API time resolution {10 ** -max(digits) * 1000:g} ms")
        rows.append(row("lateness", f"start − run_at, {store}: p50", med["p50_ms"], "ms",
                        note="; ".join(filter(None, notes))))
        rows.append(row("lateness", f"start − run_at, {store}: p99", med["p99_ms"], "ms",
                        target_key=f"lateness.{store}.p99"))
        rows.append(row("lateness", f"start − run_at, {store}: max", med["max_ms"], "ms"))
    return data, rows


# -- 7: scale

def seed_store(valet, path, count):
    """Write `count` COMPLETED echo jobs, each with a result, into a new SQLite file
    (schema made by valet.SqliteStore itself); (seconds taken, a sample of 1000 ids)."""
    t0 = time.perf_counter()
    valet.SqliteStore(str(path)).close()  # the tables and indexes, as valet makes them
    conn = sqlite3.connect(str(path), isolation_level=None)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")
               if row[1] != "seq"]        # the file's own columns: seq is assigned
    insert = (f"INSERT INTO jobs ({', '.join(columns)}) "
              f"VALUES ({', '.join('?' * len(columns))})")
    missing = [c for c in columns if c not in (
        "id", "name", "description", "task_name", "metadata", "timeout", "status",
        "failure_reason", "created_at", "started_at", "completed_at", "priority", "attempts",
        "max_retries", "retry_backoff", "run_at", "pipeline_id", "previous_job_id",
        "next_job_id", "use_previous_results", "failure_traceback")]
    if missing:
        conn.close()
        raise RuntimeError(f"valet has job columns the seeder does not know: {missing}")
    base = time.time() - 30 * 86400 - count * 0.01
    sample_at = set(random.Random(1).sample(range(count), min(1000, count)))
    sample = []

    def jobs_and_results():
        rng = random.Random(2)
        for i in range(count):
            job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if i in sample_at:
                sample.append(job_id)
            created = base + i * 0.01
            metadata = json.dumps({"i": i})
            job = {
                "id": job_id, "name": f"seed-{i}", "description": None, "task_name": "echo",
                "metadata": metadata, "timeout": None, "status": "COMPLETED",
                "failure_reason": None, "created_at": created, "started_at": created + 0.001,
                "completed_at": created + 0.002, "priority": 0, "attempts": 1,
                "max_retries": 0, "retry_backoff": 1.0, "run_at": None, "pipeline_id": None,
                "previous_job_id": None, "next_job_id": None, "use_previous_results": 0,
                "failure_traceback": None,
            }
            yield [job[c] for c in columns], (job_id, metadata, None)

    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: random ids hit a big index
        conn.execute("BEGIN")
        batch = []
        for pair in jobs_and_results():
            batch.append(pair)
            if len(batch) == 50_000:
                conn.executemany(insert, [job for job, _ in batch])
                conn.executemany("INSERT INTO results VALUES (?, ?, ?)", [r for _, r in batch])
                batch = []
        if batch:
            conn.executemany(insert, [job for job, _ in batch])
            conn.executemany("INSERT INTO results VALUES (?, ?, ?)", [r for _, r in batch])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - t0, sample


SCALE_REQUESTS = ("POST /jobs", "GET /jobs/{id}", "GET /jobs?status=PENDING",
                  "GET /jobs?status=COMPLETED", "GET /jobs")


def _scale_round(bench, db_path, seeded_ids):
    """Start valet on db_path (start-up timed), warm up, read its RSS, then time each
    kind of request on one keep-alive connection."""
    count = bench.s["scale_requests"]
    rng = random.Random()
    with ValetServer(bench.workdir, "sqlite", db_path=db_path) as server:
        client = Client(server.url)
        posted = []

        def post():
            posted.append(client.submit()["id"])

        def get_one():
            job_id = rng.choice(seeded_ids or posted)
            client.get(f"/jobs/{job_id}")

        calls = {"POST /jobs": post, "GET /jobs/{id}": get_one,
                 "GET /jobs?status=PENDING": lambda: client.get("/jobs?status=PENDING"),
                 "GET /jobs?status=COMPLETED": lambda: client.get("/jobs?status=COMPLETED"),
                 "GET /jobs": lambda: client.get("/jobs")}
        for _ in range(WARMUP_JOBS * 4):
            for fn in calls.values():
                fn()
        rss = server.rss_mib()
        result = {"startup_s": server.startup, "rss_mib": rss}
        for name in SCALE_REQUESTS:
            times = [timed(calls[name])[0] * 1000 for _ in range(count)]
            result[name] = {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}
        client.close()
    return result


def _memory_round(bench, count):
    """RSS of a memory-store valet before and after `count` no-op jobs ran."""
    with ValetServer(bench.workdir, "memory") as server:
        time.sleep(1.0)
        before = server.rss_mib()
        submitted = python_submit(server.url, JOB_BODY, count)
        Client(server.url).wait_idle(RUN_TIMEOUT, interval=0.05)
        time.sleep(0.5)
        after = server.rss_mib()
    if submitted["ok"] != count:
        raise RuntimeError(f"only {submitted['ok']} of {count} submitted")
    per_100k = None if before is None else (after - before) * 100_000 / count
    return {"rss_before_mib": before, "rss_after_mib": after, "per_100k_mib": per_100k,
            "jobs": count}


def measure_scale(bench, valet):
    """A SQLite file seeded with many finished jobs (plus results) against an empty
    one: start-up (Popen to the first 200 from /status), RSS after warm-up, and
    p50/p99 of POST /jobs, GET /jobs/{id} (random existing ids), and the first
    pages of GET /jobs?status=PENDING, GET /jobs?status=COMPLETED and GET /jobs,
    each on one keep-alive connection. A ratio seeded/empty near 1 means the
    store's size does not slow requests. memory_per_100k: RSS growth of a memory-store valet per 100k jobs
    run."""
    seed_count = bench.s["scale_seed_jobs"]
    seeded_path = Path(bench.workdir) / "seeded.db"
    progress(f"scale: seeding {seed_count:,} finished jobs")
    seed_seconds, sample = seed_store(valet, seeded_path, seed_count)
    progress(f"scale: seeded in {seed_seconds:.1f}s "
             f"({seeded_path.stat().st_size / 2**20:.0f} MiB)")
    rounds = interleave(
        bench, "scale", ("seeded", "empty"),
        lambda target, i: (_scale_round(bench, seeded_path, sample) if target == "seeded"
                           else _scale_round(bench, Path(bench.workdir) / f"empty-{i}.db", None)),
        " store")
    for i in range(bench.s["memory_rounds"]):
        progress(f"scale: memory_per_100k {i + 1}/{bench.s['memory_rounds']} "
                 f"({bench.s['memory_jobs']:,} jobs, memory store)")
        try:
            rounds.append({"target": "memory", "round": i + 1,
                           **_memory_round(bench, bench.s["memory_jobs"])})
        except Exception as exc:
            _round_error("scale", "memory", exc, rounds)

    label = f"{seed_count:,} jobs"
    data = {"seed_jobs": seed_count, "seed_seconds": seed_seconds,
            "seed_file_mib": seeded_path.stat().st_size / 2**20, "rounds": rounds,
            "medians": {}}
    rows = [row("scale", f"seed {label} (1 run)", seed_seconds, "s")]
    seeded, empty = _figures(rounds, "seeded"), _figures(rounds, "empty")
    for target, runs in (("seeded", seeded), ("empty", empty)):
        data["medians"][target] = {
            "startup_s": median([r["startup_s"] for r in runs]),
            "rss_mib": median([r["rss_mib"] for r in runs]),
            **{name: {key: median([r[name][key] for r in runs]) for key in ("p50_ms", "p99_ms")}
               for name in SCALE_REQUESTS}}
    med_s, med_e = data["medians"]["seeded"], data["medians"]["empty"]
    note = _errors_note([r for r in rounds if r.get("target") in ("seeded", "empty")])
    rows.append(row("scale", f"start-up, {label}", med_s["startup_s"], "s",
                    target_key="scale.startup", note=note))
    rows.append(row("scale", "start-up, empty", med_e["startup_s"], "s"))
    rows.append(row("scale", f"RSS after warm-up, {label}", med_s["rss_mib"], "MiB"))
    rows.append(row("scale", "RSS after warm-up, empty", med_e["rss_mib"], "MiB"))
    for name in SCALE_REQUESTS:
        for key in ("p50_ms", "p99_ms"):
            a, b = med_s[name][key], med_e[name][key]
            ratio = a / b if a is not None and b else None
            rows.append(row("scale", f"{name} {key[:3]}: seeded / empty", ratio, "×",
                            target_key="scale.ratio",
                            note=f"{_fmt(a)} / {_fmt(b)} ms"))
    memory_runs = _figures(rounds, "memory")
    per_100k = median([r["per_100k_mib"] for r in memory_runs])
    data["medians"]["memory_per_100k_mib"] = per_100k
    once = ", 1 run" if bench.s["memory_rounds"] == 1 else ""
    rows.append(row("scale", f"memory_per_100k (memory store, {bench.s['memory_jobs']:,} "
                             f"jobs{once})", per_100k, "MiB",
                    note=_errors_note([r for r in rounds if r.get("target") == "memory"])))
    return data, rows


# -- 8: footprint

def measure_footprint(bench):
    """A default-like config (SQLite file in a temp dir, a new file each time): the
    time from starting `python valet.py` to its first answer on /status, and its
    RSS when idle (a second after that)."""
    starts = []
    for i in range(bench.s["footprint_starts"]):
        progress(f"footprint: start {i + 1}/{bench.s['footprint_starts']}")
        try:
            with ValetServer(bench.workdir, "sqlite", queue_capacity=1000) as server:
                time.sleep(1.0)
                starts.append({"startup_s": server.startup, "rss_mib": server.rss_mib()})
        except Exception as exc:
            _round_error("footprint", "start", exc, starts)
    runs = [r for r in starts if "error" not in r]
    startup = median([r["startup_s"] for r in runs])
    rss = median([r["rss_mib"] for r in runs])
    note = _errors_note(starts)
    rows = [row("footprint", "start-up to first /status", startup, "s", note=note),
            row("footprint", "RSS when idle", rss, "MiB")]
    return {"starts": starts, "medians": {"startup_s": startup, "rss_mib": rss}}, rows


# -- 9: postgres

PG_NODES = (1, 2, 3)      # nodes (valet processes) sharing the database, per target
PG_HINT = ('postgres: skipped; it needs the PostgreSQL server programs (initdb, pg_ctl) '
           'and psycopg in the Python running the bench: apt-get install postgresql; '
           'pip install "psycopg[binary]" (with make bench: .venv/bin/pip install '
           '"psycopg[binary]")')
PG_DRAIN_INTERVAL = 0.05  # seconds between looks at /status while the jobs finish

# The tasks of the postgres section: record(metadata, context) appends the job's id,
# attempt and process to the file metadata["runs"] names, so that the bench can
# count the jobs run more than once. One write() of one line, O_APPEND: lines from
# several threads and processes do not mix. SQLite runs the same task.
RECORD_MODULE = "valet_bench_tasks"
RECORD_SOURCE = '''"""valet bench: a no-op task that records each run (written by bench_valet.py)."""
import os
import threading

_files = {}
_lock = threading.Lock()


def record(metadata, context):
    path = metadata["runs"]
    with _lock:
        fd = _files.get(path)
        if fd is None:
            fd = _files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{context.job_id} {context.attempt} {os.getpid()}\\n".encode())
    return None


TASKS = {"record": record}
'''


def postgres_programs():
    """The folder of initdb and pg_ctl: on PATH, or Debian's newest; None if missing."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    folders = [f for f in glob.glob("/usr/lib/postgresql/*/bin")
               if os.path.exists(os.path.join(f, "initdb"))]
    folders.sort(key=lambda f: int(f.split("/")[-2]) if f.split("/")[-2].isdigit() else 0)
    return folders[-1] if folders else None


def postgres_missing():
    """Why the postgres section cannot run here (what is missing), or None."""
    missing = []
    if postgres_programs() is None:
        missing.append("initdb and pg_ctl not found")
    try:
        import psycopg  # noqa: F401 (only this section needs it)
    except ImportError:
        missing.append(f"no psycopg in {sys.executable}")
    return "; ".join(missing) or None


class PostgresServer:
    """A throwaway PostgreSQL server (a context manager): initdb in a new temporary
    folder, pg_ctl start on a free port of HOST (its socket in that folder), as the
    user nobody when the bench runs as root (PostgreSQL refuses root). Its settings
    are the defaults, fsync and synchronous_commit on: the bench measures a durable
    store. __exit__ stops it (pg_ctl stop -m fast, else immediate, else SIGKILL) and
    removes the folder, also when starting failed half-way."""

    def __init__(self):
        self.programs = postgres_programs()
        self.port = free_port()
        self.folder = None
        self.dsn = f"host={HOST} port={self.port} user=valet dbname=postgres"
        self.settings = {}
        self._user = {"user": "nobody"} if os.geteuid() == 0 else {}

    def _run(self, *args, timeout=120):
        return subprocess.run([os.path.join(self.programs, args[0]), *args[1:]], check=True,
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.folder, **self._user)

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix="valet-bench-pg-")
        try:
            if self._user:
                import pwd  # (POSIX only, as PostgreSQL's refusal to run as root is)
                os.chown(self.folder, pwd.getpwnam("nobody").pw_uid, -1)
            data = os.path.join(self.folder, "data")
            self._run("initdb", "-D", data, "-U", "valet", "--auth=trust", "-E", "UTF8")
            self._run("pg_ctl", "-D", data, "-l", os.path.join(self.folder, "log"), "-w",
                      "-t", "60", "-o", f"-p {self.port} -h {HOST} -k {self.folder}", "start",
                      timeout=90)
            import psycopg
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                             "max_connections", "shared_buffers"):
                    self.settings[name] = conn.execute(f"SHOW {name}").fetchone()[0]
        except BaseException as exc:
            log = self.log_tail()
            self._stop()
            if isinstance(exc, subprocess.CalledProcessError):
                raise RuntimeError(f"{Path(exc.cmd[0]).name} failed ({exc.returncode}): "
                                   f"{(exc.stderr or '').strip()[-300:]} {log}") from None
            raise
        return self

    def __exit__(self, *exc):
        self._stop()

    def log_tail(self):
        try:
            return Path(self.folder, "log").read_text(errors="replace")[-300:]
        except (OSError, TypeError):
            return ""

    def _stop(self):
        if self.folder is None:
            return
        data = os.path.join(self.folder, "data")
        pid_file = os.path.join(data, "postmaster.pid")
        for mode in ("fast", "immediate"):
            if not os.path.exists(pid_file):
                break
            try:
                self._run("pg_ctl", "-D", data, "-m", mode, "-w", "-t", "30", "stop",
                          timeout=45)
            except (subprocess.SubprocessError, OSError):
                continue
        if os.path.exists(pid_file):  # pg_ctl could not stop it: kill the postmaster
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(Path(pid_file).read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def execute(self, sql):
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql)


def wrk_spread_load(urls, body, seconds, cap):
    """Load with one wrk process of one thread per server in `urls` (thread i sends to
    urls[i]), WRK_CONNECTIONS connections between them (rounded down to a multiple
    of the threads, so that each server has as many), for `seconds`; each thread
    stops once it has sent its share of `cap` requests (a bound; reaching it
    makes the req/s low, which the result says: "capped")."""
    threads = len(urls)
    connections = max(threads, WRK_CONNECTIONS // threads * threads)
    per_thread = max(1, cap // threads)
    ports = ", ".join(str(urllib.parse.urlsplit(url).port) for url in urls)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\n'
                     f"wrk.body = [==[{json.dumps(body)}]==]\n"
                     'wrk.headers["Content-Type"] = "application/json"\n'
                     f"local ports = {{{ports}}}\n"
                     "local made = 0\n"
                     "function setup(thread)\n"
                     "  made = made + 1\n"
                     "  local port = ports[(made - 1) % #ports + 1]\n"
                     f'  thread.addr = wrk.lookup("{HOST}", tostring(port))[1]\n'
                     "end\n"
                     f"local left = {per_thread}\n"
                     "local req = nil\n"
                     "function request()\n"
                     "  if req == nil then req = wrk.format() end\n"
                     "  left = left - 1\n"
                     "  if left == 0 then wrk.thread:stop() end\n"
                     "  return req\n"
                     "end\n")
    try:
        out = run_child([shutil.which("wrk"), f"-t{threads}", f"-c{connections}",
                         f"-d{seconds}s", "--latency", "-s", script.name, f"{urls[0]}/jobs"],
                        timeout=seconds + 30)
    finally:
        os.unlink(script.name)
    result = parse_wrk(out)
    result["tool"] = f"wrk -t{threads} -c{connections}"
    result["capped"] = result["requests"] >= per_thread * threads - connections
    return result


def spread_load(urls, body, seconds, use_wrk, cap):
    """load() over several servers at once (see wrk_spread_load; the built-in
    generator's LOAD_PROCESSES processes take the servers in turn), at most `cap`
    requests."""
    if use_wrk:
        return wrk_spread_load(urls, body, seconds, cap)
    result = python_load(urls, body, seconds, count=cap)
    result["capped"] = result["requests"] >= cap
    return result


def _pg_target(target):
    """("sqlite", 1) or ("postgres", n) from "sqlite" or "postgres 2"."""
    store, _, nodes = target.partition(" ")
    return store, int(nodes or 1)


@contextlib.contextmanager
def _pg_nodes(bench, pg, target, schema):
    """The valet processes of a target, started one after the other and stopped
    (every one of them, whatever happens): one on a fresh SQLite file, or n nodes
    on a fresh schema of the PostgreSQL server, each with a config of its own (the
    dsn and schema, WORKERS workers) and RECORD_MODULE as its tasks. The schema is
    dropped afterwards."""
    store, n = _pg_target(target)
    postgres = {"dsn": pg.dsn, "schema": schema} if store == "postgres" else None
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for _ in range(n):
                server = ValetServer(bench.workdir, store, postgres=postgres,
                                     tasks_module=RECORD_MODULE, tasks_source=RECORD_SOURCE)
                servers.append(stack.enter_context(server))
            yield servers
    finally:
        if postgres is not None:
            with contextlib.suppress(Exception):
                pg.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _pg_settle(url, at_least, timeout):
    """Poll /status (every PG_DRAIN_INTERVAL s) until no job is left to run in the
    store and it holds at least `at_least` jobs, or `timeout` seconds pass; its
    jobs by status then, and whether that happened in time."""
    client = Client(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            jobs = client.get("/status")["jobs"]
            if jobs is not None:
                finished = sum(jobs.get(status, 0) for status in FINISHED)
                if sum(jobs.values()) == finished >= at_least:
                    return jobs, True
            if time.monotonic() > deadline:
                return jobs or {}, False
            time.sleep(PG_DRAIN_INTERVAL)
    finally:
        client.close()


def _pg_runs(path):
    """(runs recorded, jobs run more than once) from a record file."""
    try:
        lines = Path(path).read_text().split("\n")
    except FileNotFoundError:
        return 0, 0
    counts = collections.Counter(line.split(" ", 1)[0] for line in lines if line)
    return sum(counts.values()), sum(1 for n in counts.values() if n > 1)


def _pg_checks(servers, jobs, acked, runs_path, settled, drain_s):
    """The figures every round of the section ends with: jobs stored, completed and
    not completed (of those stored or acknowledged, whichever is more), runs
    recorded, jobs run twice, ERROR lines in the nodes' logs."""
    runs, twice = _pg_runs(runs_path)
    stored = sum(jobs.values())
    completed = jobs.get("COMPLETED", 0)
    return {"stored": stored, "completed": completed,
            "not_completed": max(stored, acked) - completed, "runs": runs,
            "run_twice": twice, "settled": settled, "drain_seconds": drain_s,
            "log_errors": sum(server.log_count(" ERROR ") for server in servers)}


def _pg_submit_round(bench, pg, target, i):
    """POST /jobs load spread over the target's servers for postgres_load_seconds (as
    the submit section loads one server); then, on PostgreSQL, until every job
    accepted has run (at most RUN_TIMEOUT s), and the checks."""
    store, n = _pg_target(target)
    runs_path = Path(bench.workdir) / f"runs-submit-{i + 1}-{store}-{n}.txt"
    body = {"name": "bench", "task_name": "record", "metadata": {"runs": str(runs_path)}}
    with _pg_nodes(bench, pg, target, f"bench_submit_{i + 1}_{n}") as servers:
        urls = [server.url for server in servers]
        result = spread_load(urls, body, bench.s["postgres_load_seconds"], bench.use_wrk,
                             bench.s["postgres_max_requests"])
        result["nodes"] = n
        if store == "postgres":
            acked = result["requests"] - result.get("non_2xx", 0)  # (python: 2xx only)
            t0 = time.monotonic()
            jobs, settled = _pg_settle(urls[0], acked, RUN_TIMEOUT)
            result.update(_pg_checks(servers, jobs, acked, runs_path, settled,
                                     time.monotonic() - t0))
        else:
            result["log_errors"] = servers[0].log_count(" ERROR ")
    return result


def _pg_end_to_end_round(bench, pg, target, i):
    """N jobs submitted by LOAD_PROCESSES processes (N/P each) spread over the
    target's servers, then run; jobs/s = N / (the last job's completed_at − the
    first POST). (end_to_end stops its clock at the /status that shows the queue
    empty, polled every 2 ms; with several nodes that takes a look at the store,
    and would load it, so the clock stops here at the last completed_at, and
    /status is looked at every PG_DRAIN_INTERVAL s only to know it is over.)"""
    store, n = _pg_target(target)
    count = bench.s["postgres_jobs"]
    runs_path = Path(bench.workdir) / f"runs-e2e-{i + 1}-{store}-{n}.txt"
    body = {"name": "bench", "task_name": "record", "metadata": {"runs": str(runs_path)}}
    with _pg_nodes(bench, pg, target, f"bench_e2e_{i + 1}_{n}") as servers:
        urls = [server.url for server in servers]
        submitted = python_submit(urls, body, count)
        t0 = time.monotonic()
        jobs, settled = _pg_settle(urls[0], submitted["ok"], RUN_TIMEOUT)
        drain_s = time.monotonic() - t0
        client = Client(urls[0])
        done = client.list_jobs("COMPLETED")
        client.close()
        result = _pg_checks(servers, jobs, submitted["ok"], runs_path, settled, drain_s)
    if not done:
        raise RuntimeError("no job completed")
    last = max(parse_time(job["completed_at"]) for job in done)
    elapsed = last - submitted["first"]
    return {"jobs_per_s": count / elapsed if settled else None, "seconds": elapsed,
            "nodes": n, "submitted": submitted["ok"], "errors": submitted["errors"],
            "submit_seconds": submitted["last"] - submitted["first"], **result}


def _pg_shared_note(n):
    cores = os.cpu_count() or 1
    if n + 1 <= cores:
        return ""
    return (f"{n} node{'s' if n > 1 else ''} and the PostgreSQL server share "
            f"{cores} core{'s' if cores > 1 else ''} (with the load)")


def measure_postgres(bench):
    """storage.option: postgres with 1, 2 and 3 nodes, against SQLite, in the same
    interleaved rounds and by the same clients. submit: POST /jobs for
    postgres_load_seconds, spread over the nodes (wrk: one thread per node, the
    connections split evenly; or the built-in generator's processes, taking the
    nodes in turn). end to end: postgres_jobs jobs submitted (spread alike) and run.
    Every valet has WORKERS workers and runs RECORD_MODULE's record, a no-op that
    appends the job's id to a file: after each PostgreSQL round, once every job
    has finished, the bench counts the jobs run more than once and those not
    COMPLETED (both must be 0). Each round gets a fresh schema (dropped after)."""
    missing = postgres_missing()
    if missing:
        line = f"{PG_HINT} ({missing})"
        progress(line)
        bench.notes.append(line)
        return {"skipped": line}, []
    targets = ("sqlite",) + tuple(f"postgres {n}" for n in PG_NODES)
    count = bench.s["postgres_jobs"]
    seconds = bench.s["postgres_load_seconds"]
    with PostgresServer() as pg:
        progress(f"postgres: server {pg.settings.get('server_version')} on port {pg.port} "
                 f"(fsync {pg.settings.get('fsync')}, synchronous_commit "
                 f"{pg.settings.get('synchronous_commit')})")
        submit_rounds = interleave(bench, "postgres", targets,
                                   lambda target, i: _pg_submit_round(bench, pg, target, i),
                                   f" (POST /jobs, {seconds}s load)")
        e2e_rounds = interleave(bench, "postgres", targets,
                                lambda target, i: _pg_end_to_end_round(bench, pg, target, i),
                                f" ({count:,} jobs end to end)")
        server_settings = dict(pg.settings)

    shared = _pg_shared_note(max(PG_NODES))
    data = {"server": server_settings, "nodes": list(PG_NODES), "workers_per_node": WORKERS,
            "load_seconds": seconds, "max_requests": bench.s["postgres_max_requests"],
            "jobs": count, "cores": os.cpu_count(), "cores_note": shared,
            "submit_rounds": submit_rounds, "end_to_end_rounds": e2e_rounds, "medians": {}}
    if shared:
        bench.notes.append(f"postgres: {shared}; their figures are of nodes that "
                           f"compete for the CPU, not of nodes on machines of their own")
    rows = []

    def label(target):
        store, n = _pg_target(target)
        return "SQLite" if store == "sqlite" else f"PostgreSQL, {n} node{'s' * (n > 1)}"

    def failed_note(rounds, target):
        return _errors_note([r for r in rounds if r.get("target") == target])

    # POST /jobs
    base = None
    for target in targets:
        runs = _figures(submit_rounds, target)
        med = {key: median([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms")}
        if target == "sqlite":
            base = med["rps"]
        ratio = med["rps"] / base if med["rps"] is not None and base else None
        data["medians"][f"submit {target}"] = {**med, "ratio_to_sqlite": ratio}
        tools = sorted({r["tool"] for r in runs})
        capped = sum(1 for r in runs if r.get("capped"))
        note = "; ".join(filter(None, [
            f"{ratio:.2f} × SQLite" if target != "sqlite" and ratio is not None else "",
            f"p50 {_fmt(med['p50_ms'])} ms, p99 {_fmt(med['p99_ms'])} ms",
            ", ".join(tools),
            _pg_shared_note(_pg_target(target)[1]) if target != "sqlite" else "",
            f"! {capped} round(s) stopped at the cap of "
            f"{bench.s['postgres_max_requests']:,} requests" if capped else "",
            failed_note(submit_rounds, target)]))
        rows.append(row("postgres", f"POST /jobs, {label(target)}: req/s", med["rps"],
                        "req/s", note=note))

    # end to end
    base = None
    for target in targets:
        runs = _figures(e2e_rounds, target)
        rate = median([r["jobs_per_s"] for r in runs])
        secs = median([r["seconds"] for r in runs])
        if target == "sqlite":
            base = rate
        ratio = rate / base if rate is not None and base else None
        data["medians"][f"end_to_end {target}"] = {"jobs_per_s": rate, "seconds": secs,
                                                   "ratio_to_sqlite": ratio}
        short = [r["completed"] for r in runs if r["completed"] != count]
        note = "; ".join(filter(None, [
            f"{ratio:.2f} × SQLite" if target != "sqlite" and ratio is not None else "",
            f"{_fmt(secs)} s",
            _pg_shared_note(_pg_target(target)[1]) if target != "sqlite" else "",
            f"! only {short} of {count:,} COMPLETED" if short else "",
            failed_note(e2e_rounds, target)]))
        rows.append(row("postgres", f"{count:,} jobs end to end, {label(target)}: jobs/s",
                        rate, "jobs/s", note=note))

    # the checks, over every round of each number of nodes
    for target in targets[1:]:
        sub, e2e = _figures(submit_rounds, target), _figures(e2e_rounds, target)
        both = sub + e2e
        failed = failed_note(submit_rounds + e2e_rounds, target)
        unsettled = sum(1 for r in both if not r["settled"])
        checks = {}
        for key, what in (("run_twice", "jobs run twice"),
                          ("not_completed", "jobs not completed")):
            value = sum(r[key] for r in both) if both else None
            checks[key] = value
            note = "; ".join(filter(None, [
                f"per round: POST /jobs {[r[key] for r in sub]}, "
                f"end to end {[r[key] for r in e2e]}",
                f"of {sum(r['stored'] for r in both):,} jobs, "
                f"{sum(r['runs'] for r in both):,} runs" if key == "run_twice" else
                f"! {unsettled} round(s) not finished after {RUN_TIMEOUT:.0f}s"
                if unsettled else "",
                failed]))
            rows.append(row("postgres", f"{label(target)}: {what}", value, "jobs",
                            target_key=f"postgres.{key}", note=note))
        checks["log_errors"] = sum(r["log_errors"] for r in both)
        data["medians"][f"checks {target}"] = checks
    return data, rows


# ------------------------------------------------------------------- report --

def _fmt(value):
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


_COLUMNS = ("Section", "Measure", "Value", "Unit", "× ceiling", "Target", "Verdict", "Note")


def _cells(r):
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
    value = "" if r["what"] == "ERROR" else _fmt(r["value"])
    return [r["section"], r["what"], value, r["unit"], ratio, r["target"], r["verdict"],
            r["note"]]


def header_lines(meta):
    m = meta["machine"]
    return [
        f"valet {meta['valet_version']} benchmark, {meta['date']} "
        f"({'quick' if meta['quick'] else 'full'} run, {meta['settings']['rounds']} rounds, "
        f"median shown)",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}",
        f"load tool: {meta['load_tool']}",
    ]


def plain_table(rows):
    table = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    right = {2, 4}  # numbers
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows):
    out = ["| " + " | ".join(_COLUMNS) + " |",
           "|" + "|".join(["---", "---", "---:", "---", "---:", "---", "---", "---"]) + "|"]
    for r in rows:
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(r)) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------- main --

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Benchmark valet (see the docstring).")
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 4 min)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--no-wrk", action="store_true", help="use the built-in load generator")
    parser.add_argument("--only", help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--against", metavar="REV",
                        help="also measure submit with valet.py and tasks.py as they were "
                             "at this git revision, in the same interleaved rounds")
    # Hidden modes: the bench runs copies of itself as load processes and ceiling server.
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.only:
        unknown = set(name for name in args.only.split(",") if name) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(SECTIONS)}")
    return args


def checkout(revision, folder):
    """valet.py and tasks.py as they were at a git revision, written into `folder`."""
    folder.mkdir()
    for name in ("valet.py", "tasks.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"],
                              check=True, capture_output=True).stdout
        (folder / name).write_bytes(text)
    return folder


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so that every finally runs and children are stopped


def run_benchmarks(args):
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds:
        settings["rounds"] = args.rounds
    selected = [name for name in args.only.split(",") if name] if args.only else list(SECTIONS)
    use_wrk = bool(shutil.which("wrk")) and not args.no_wrk

    sys.path.insert(0, str(ROOT))
    import valet  # noqa: E402  (needs PyYAML; only the benchmark itself needs it)

    meta = {
        "machine": machine_info(),
        "valet_version": valet.__version__,
        "load_tool": (f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}" if use_wrk else
                      f"python ({LOAD_PROCESSES} processes, 1 keep-alive connection each)"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "settings": settings,
        "sections": selected,
        "targets": {key: f"{on} {op} {bound:g}" for key, (op, bound, on) in TARGETS.items()},
    }
    for line in header_lines(meta):
        progress(line)

    results, rows = {}, []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="valet-bench-") as workdir:
        bench = Bench(settings, workdir, use_wrk)
        if args.against:
            bench.against = (args.against, checkout(args.against, Path(workdir) / "against"))
            meta["against"] = args.against
        plan = []
        if "ceiling" in selected or "submit" in selected:  # submit needs the ceiling
            plan.append(("submit" if "submit" in selected else "ceiling",
                         lambda: measure_ceiling_and_submit(bench, "submit" in selected)))
        measures = {"end_to_end": lambda: measure_end_to_end(bench),
                    "workers": lambda: measure_workers(bench),
                    "idle_latency": lambda: measure_idle_latency(bench),
                    "lateness": lambda: measure_lateness(bench),
                    "scale": lambda: measure_scale(bench, valet),
                    "footprint": lambda: measure_footprint(bench),
                    "postgres": lambda: measure_postgres(bench)}
        plan += [(name, measures[name]) for name in SECTIONS if name in measures
                 and name in selected]
        try:
            for name, measure in plan:
                t0 = time.monotonic()
                try:
                    data, section_rows = measure()
                except Exception as exc:
                    progress(f"{name}: failed: {type(exc).__name__}: {exc}")
                    traceback.print_exc(file=sys.stderr)
                    data, section_rows = {"error": f"{type(exc).__name__}: {exc}"}, \
                        [error_row(name, exc)]
                data["seconds"] = time.monotonic() - t0
                results[name] = data
                rows += section_rows
                progress(f"{name}: done in {data['seconds']:.0f}s")
        finally:
            kill_children()
    meta["seconds"] = time.monotonic() - t_start
    return meta, results, rows, bench.notes


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.load_worker:
        return load_worker_main(args)
    if args.ceiling_server is not None:
        return ceiling_server_main(args.ceiling_server)

    # Ctrl-C raises KeyboardInterrupt (even where the shell started us with SIGINT
    # ignored) and SIGTERM raises SystemExit: either way every finally runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        meta, results, rows, notes = run_benchmarks(args)
    except (KeyboardInterrupt, SystemExit):
        progress("interrupted: stopping every process the bench started")
        kill_children()
        return 130
    finally:
        kill_children()

    verdicts = [r["verdict"] for r in rows]
    summary = (f"{verdicts.count('ok')} ok, {verdicts.count('MISSED')} missed, "
               f"{verdicts.count('ERROR')} errors; took {meta['seconds']:.0f}s")
    print()
    print("\n".join(header_lines(meta)))
    print()
    print(plain_table(rows))
    print()
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(summary)
    print()
    print("Markdown:")
    print()
    print("\n".join(f"{line}  " for line in header_lines(meta)))
    print()
    print(markdown_table(rows))

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**meta, "results": results, "rows": rows,
                                     "notes": list(dict.fromkeys(notes)), "summary": summary},
                                    indent=2, default=str) + "\n")
    progress(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
