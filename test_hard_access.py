"""Access control of the HTTP API: the bearer token (config and VALET_AUTH_TOKEN),
the JSON content type of a body, the Host header, Origin and CORS, and the start-up
warning for an exposed server. Real servers on 127.0.0.1, raw sockets where the
exact bytes of a request matter, and one real `python valet.py` process."""

from test_valet import *  # noqa: F401,F403 (fixtures and helpers)

# The star import brought test_valet's tests too: pytest would run them again here.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]
del _name

import http.client
import json
import logging
import os
import signal
import socket
import re
import subprocess
import sys

import pytest

import valet
from test_valet import HERE, Response, call

TOKEN = "s3cret-Token_0123456789~!"  # 25 printable ASCII characters, no space
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# how a config error says that it leaves the token out ("(hidden)" in the brief)
HIDDEN = re.compile(r"\(hidden\)|not shown")
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


def post_job(port, host, *extra):
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


# ------------------------------------------------------------------- config --

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


# ------------------------------------------------------------------ exposed --

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


# -------------------------------------------------------------------- token --

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


# ------------------------------------------------------------- content type --

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


# --------------------------------------------------------------------- host --

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
    resp = post_job(app.port, "evil.example")
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
    assert post_job(app.port, "jobs.example", f"Authorization: Bearer {TOKEN}").status == 202


def test_explicit_allowed_hosts_allow_that_host_and_refuse_others_even_with_token(make_app):
    app = make_app(**{"server.auth_token": TOKEN, "server.allowed_hosts": ["jobs.example"]})
    auth = f"Authorization: Bearer {TOKEN}"
    for host in ("jobs.example", "jobs.example:8443", "JOBS.example:1"):
        assert get_status(app.port, host, auth).status == 200, host
    for host in ("other.example", "jobs.example.evil", f"127.0.0.1:{app.port}"):
        resp = get_status(app.port, host, auth)
        assert resp.status == 403 and "server.allowed_hosts" in resp.body["message"], host
    assert post_job(app.port, "other.example", auth).status == 403
    assert post_job(app.port, "jobs.example", auth).status == 202
    resp = post_job(app.port, "jobs.example", auth)
    assert resp.status == 202
    listed = raw(app.port, f"GET /jobs HTTP/1.1\r\nHost: jobs.example\r\n{auth}\r\n"
                           f"Connection: close\r\n\r\n".encode())
    assert len(listed.body["jobs"]) == 2  # the refused one was not created


def test_star_allowed_hosts_allows_any_host(make_app):
    app = make_app(**{"server.allowed_hosts": ["*"]})
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


# ------------------------------------------------------------ origin / CORS --

def test_cross_site_simple_post_is_refused_with_403_and_creates_nothing(make_app):
    app = make_app()
    form = b"name=n&task_name=echo"
    for origin, content_type, body in (
            ("http://evil.example", "text/plain", form),
            ("http://evil.example", "application/x-www-form-urlencoded", form),
            ("http://evil.example", "application/json", NEW_JOB_BYTES),
            (f"http://127.0.0.1:{app.port + 1 if app.port < 65535 else 1}",
             "application/json", NEW_JOB_BYTES),
            (f"https://127.0.0.1:{app.port}", "application/json", NEW_JOB_BYTES),
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


def test_star_cors_origins_allows_any_origin(make_app):
    app = make_app(**{"server.cors_origins": ["*"]})
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
    assert resp.status == 405 and resp.headers["Allow"] == "POST, GET, DELETE"
    assert "Access-Control-Allow-Origin" not in resp.headers


# ------------------------------------------------------------------ process --

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
