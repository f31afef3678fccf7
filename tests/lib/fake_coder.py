#!/usr/bin/env python3
"""A fake Coder control plane for the bats suite: exactly the endpoints envbox's start-up log uses.

  GET   /api/v2/buildinfo                     public; {"version": ...}
  POST  /api/v2/workspaceagents/me/log-source {"id": uuid, "display_name": str, "icon": str} -> 201
  PATCH /api/v2/workspaceagents/me/logs       {"log_source_id": uuid, "logs": [{"created_at": RFC 3339,
                                               "output": str, "level": trace|debug|info|warn|error}]} -> 200

Checks made as Coder makes them: a missing or wrong Coder-Session-Token is 401, a content type other than
application/json is 415, a body that does not match the schema is 400, a log_source_id that was never
registered (other than the nil UUID, Coder's "External" source) is 400, more than 1 MiB of output in
total is 413. Every accepted request is appended to --record as one JSON line:
  {"time": <unix seconds>, "method": "PATCH", "path": "...", "body": {...}}

Modes: ok (the above), nosource (a Coder from before log sources: POST log-source is 404, logs go
under the nil "External" source), 401 (every authenticated request is rejected), hang (TCP connections are accepted
and never answered, not even the TLS handshake), down (nothing listens: connections are refused).

Usage: fake_coder.py --listen ADDR:PORT --cert PEM --key PEM --token TOKEN --record FILE
                     [--mode ok|nosource|401|hang|down] [--ready FILE]
--ready is written (with the pid) once the server accepts connections, in every mode.
Python 3 standard library only.
"""

import argparse
import http.server
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import uuid

BUILDINFO = {"external_url": "https://coder.example.com", "version": "v2.16.0+fake", "dashboard_url": "/"}
LEVELS = {"trace", "debug", "info", "warn", "error"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
NIL_UUID = "00000000-0000-0000-0000-000000000000"
MAX_BODY = 2 << 20  # what this server reads at most
LOG_LIMIT = 1 << 20  # Coder's limit on agent log output per build


def is_uuid(v):
    if not isinstance(v, str):
        return False
    try:
        return str(uuid.UUID(v)) == v.lower()
    except ValueError:
        return False


def check_log_source(body):
    if not isinstance(body, dict):
        return "body must be an object"
    if not is_uuid(body.get("id")):
        return "id must be a UUID"
    for key in ("display_name", "icon"):
        if key in body and not isinstance(body[key], str):
            return f"{key} must be a string"
    if not body.get("display_name"):
        return "display_name is required"
    return None


def check_logs(body):
    if not isinstance(body, dict):
        return "body must be an object"
    if not is_uuid(body.get("log_source_id")):
        return "log_source_id must be a UUID"
    logs = body.get("logs")
    if not isinstance(logs, list) or not logs:
        return "logs must be a non-empty list"
    for i, entry in enumerate(logs):
        if not isinstance(entry, dict):
            return f"logs[{i}] must be an object"
        if not isinstance(entry.get("created_at"), str) or not RFC3339.match(entry["created_at"]):
            return f"logs[{i}].created_at must be an RFC 3339 time"
        if not isinstance(entry.get("output"), str):
            return f"logs[{i}].output must be a string"
        if "\x00" in entry["output"]:
            return f"logs[{i}].output contains NUL"
        if entry.get("level") not in LEVELS:
            return f"logs[{i}].level must be one of {sorted(LEVELS)}"
    return None


class State:
    def __init__(self, args):
        self.token = args.token
        self.mode = args.mode
        self.record_path = args.record
        self.lock = threading.Lock()
        self.sources = {NIL_UUID}
        self.output_bytes = 0

    def record(self, method, path, body):
        line = json.dumps({"time": time.time(), "method": method, "path": path, "body": body})
        with self.lock, open(self.record_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Coder
    server_version = "fake-coder"
    state = None  # set in main

    def log_message(self, fmt, *args):
        sys.stderr.write("fake_coder: %s - %s\n" % (self.address_string(), fmt % args))

    def reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, message, detail=""):
        self.reply(code, {"message": message, "detail": detail})

    def read_body(self):
        """Returns (parsed JSON, None) or (None, already-sent error)."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.error(400, "Bad Content-Length.")
            return None, True
        if length > MAX_BODY:
            self.error(413, "Request body too large.")
            self.close_connection = True
            return None, True
        raw = self.rfile.read(length)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.error(415, "Unsupported content type.", f"got {ctype!r}, want application/json")
            return None, True
        try:
            return json.loads(raw.decode("utf-8")), None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.error(400, "Request body must be valid JSON.", str(e))
            return None, True

    def authorized(self):
        st = self.state
        if st.mode == "401" or self.headers.get("Coder-Session-Token") != st.token:
            # Like Coder: the message never echoes the token.
            self.error(401, "Workspace agent not authorized.", "Invalid or missing Coder-Session-Token.")
            return False
        return True

    def do_GET(self):
        if self.path == "/api/v2/buildinfo":
            self.reply(200, BUILDINFO)
        else:
            self.error(404, "Route not found.")

    def do_POST(self):
        if self.path != "/api/v2/workspaceagents/me/log-source" or self.state.mode == "nosource":
            self.error(404, "Route not found.")
            return
        if not self.authorized():
            return
        body, err = self.read_body()
        if err:
            return
        problem = check_log_source(body)
        if problem:
            self.error(400, "Invalid request body.", problem)
            return
        st = self.state
        with st.lock:
            st.sources.add(body["id"].lower())
        st.record("POST", self.path, body)
        self.reply(201, {
            "id": body["id"], "display_name": body["display_name"], "icon": body.get("icon", ""),
            "workspace_agent_id": "7ad2e618-fea7-4c1a-b70a-f501566a72f1",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def do_PATCH(self):
        if self.path != "/api/v2/workspaceagents/me/logs":
            self.error(404, "Route not found.")
            return
        if not self.authorized():
            return
        body, err = self.read_body()
        if err:
            return
        problem = check_logs(body)
        st = self.state
        if not problem and body["log_source_id"].lower() not in st.sources:
            problem = "log_source_id was not registered"
        if problem:
            self.error(400, "Invalid request body.", problem)
            return
        size = sum(len(e["output"].encode()) for e in body["logs"])
        with st.lock:
            if st.output_bytes + size > LOG_LIMIT:
                over = True
            else:
                over = False
                st.output_bytes += size
        if over:
            self.error(413, "Log limit exceeded.")
            return
        st.record("PATCH", self.path, body)
        self.reply(200, {})

    def do_PUT(self):
        self.error(405, "Method not allowed.")

    do_DELETE = do_PUT


def write_ready(path):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)


def parse_listen(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def hang(addr, ready):
    """Accepts TCP connections and holds them open without a byte in reply."""
    srv = socket.create_server(addr, backlog=128, reuse_port=False)
    held = []
    write_ready(ready)
    while True:
        conn, _ = srv.accept()
        held.append(conn)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="ADDR:PORT")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--mode", choices=["ok", "nosource", "401", "hang", "down"], default="ok")
    p.add_argument("--ready")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    addr = parse_listen(args.listen)
    open(args.record, "a").close()

    if args.mode == "down":
        write_ready(args.ready)
        while True:
            time.sleep(3600)
    if args.mode == "hang":
        hang(addr, args.ready)
        return

    Handler.state = State(args)
    httpd = http.server.ThreadingHTTPServer(addr, Handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    # The handshake happens in the connection's thread, so a stalled client cannot block accept().
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    write_ready(args.ready)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
