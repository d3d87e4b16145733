"""Hostile or broken clients: floods of connections, slow and stalled requests,
smuggling attempts, resets, huge numbers, deep nesting and huge paths. Every test
talks to a real server over real sockets (raw ones where the framing matters)."""

from test_valet import *  # noqa: F401,F403  (fixtures and helpers)

import http.client
import json
import logging
import os
import re
import select
import selectors
import shutil
import socket
import struct
import signal
import subprocess
import sys
import threading
import time

import pytest

import valet
from test_valet import (HERE, PROCESS_TASKS, call, request, stage, submit, wait_for_status,
                         wait_until)

# `import *` brought test_valet's tests as well: pytest would run them again here.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]
del _name

HUGE = int("7" * 400)  # a 400-digit integer
GET_STATUS = b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"


# ------------------------------------------------------------------ helpers --

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


# ------------------------------------------------- backlog and connections --

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


# ------------------------------------------------------------------ timeouts --

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


# ----------------------------------------------------------------- framing --

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


def test_empty_line_before_the_request_line_is_skipped(app):
    with connect(app) as sock:
        sock.sendall(b"\r\n" + GET_STATUS)
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 200 and json.loads(body)["version"] == valet.__version__


# ------------------------------------------------------------------- resets --

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


# --------------------------------------------------- huge numbers, deep JSON --

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


# ----------------------------------------------------------------- log lines --

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
