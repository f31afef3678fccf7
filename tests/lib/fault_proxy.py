#!/usr/bin/env python3
"""A TLS-terminating HTTP proxy in front of the test registry that injects faults, for the harness only.

It serves HTTPS on --listen with its own certificate and forwards each request to --upstream over
HTTPS (verified against --upstream-ca), passing the response through. Faults, set per run:

  --reset-after N --reset-match S [--reset-times K]
      for the first K (default 1) GET responses whose path contains S, send the headers and N bytes
      of the body, then reset the TCP connection (SO_LINGER 0: RST, no TLS close_notify);
  --fail-status C --fail-times K --fail-match S
      answer the first K requests whose path contains S with status C (e.g. two 503s), without
      contacting the registry.

Every request is logged to --log as one tab-separated line, written when its response is done:
  METHOD  PATH  RANGE-or-"-"  STATUS  ACTION  BODY-BYTES-SENT
with ACTION one of pass, reset, injected.

Usage: fault_proxy.py --listen ADDR:PORT --cert CERT --key KEY --upstream HOST:PORT
       --upstream-ca CA --log FILE [faults...]
"""

import argparse
import http.client
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}


class Faults:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.resets_left = args.reset_times if args.reset_after is not None else 0
        self.reset_after = args.reset_after
        self.reset_match = args.reset_match
        self.fails_left = args.fail_times if args.fail_status else 0
        self.fail_status = args.fail_status
        self.fail_match = args.fail_match

    def take_fail(self, path):
        with self.lock:
            if self.fails_left > 0 and self.fail_match in path:
                self.fails_left -= 1
                return True
        return False

    def take_reset(self, method, path):
        with self.lock:
            if method == "GET" and self.resets_left > 0 and self.reset_match in path:
                self.resets_left -= 1
                return True
        return False


def make_handler(args, faults, log, log_lock, upstream_ctx):
    up_host, up_port = args.upstream.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def record(self, status, action, sent):
            line = "\t".join([self.command, self.path, self.headers.get("Range") or "-",
                              str(status), action, str(sent)])
            with log_lock:
                log.write(line + "\n")
                log.flush()

        def reset(self):
            try:
                self.wfile.flush()
            except OSError:
                pass
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Close the TCP socket under the TLS layer: the peer sees a reset, not a TLS close.
                raw = socket.socket(fileno=self.connection.detach())
                raw.close()
            except OSError:
                pass
            self.close_connection = True

            class Sink:
                def write(self, b):
                    return len(b)

                def flush(self):
                    pass

            self.wfile = Sink()

        def handle_one(self):
            path = self.path
            if faults.take_fail(path):
                body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by fault_proxy"}]}'
                self.send_response(faults.fail_status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.record(faults.fail_status, "injected", 0)
                return
            n = int(self.headers.get("Content-Length") or 0)
            req_body = self.rfile.read(n) if n else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPSConnection(up_host, int(up_port), context=upstream_ctx, timeout=60)
            try:
                conn.request(self.command, path, body=req_body, headers=headers)
                resp = conn.getresponse()
                reset = faults.take_reset(self.command, path) and resp.status in (200, 206)
                length = resp.getheader("Content-Length")
                body = None
                if self.command != "HEAD" and length is None:
                    body = resp.read()
                    length = str(len(body))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                sent = 0
                if self.command == "HEAD":
                    self.record(resp.status, "pass", 0)
                    return
                if body is not None:
                    self.wfile.write(body)
                    sent = len(body)
                else:
                    while True:
                        chunk = resp.read(64 * 1024)
                        if not chunk:
                            break
                        if reset and sent + len(chunk) >= args.reset_after:
                            chunk = chunk[: args.reset_after - sent]
                            self.wfile.write(chunk)
                            sent += len(chunk)
                            self.record(resp.status, "reset", sent)
                            self.reset()
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                self.record(resp.status, "pass", sent)
            finally:
                conn.close()

        def do_GET(self):
            self.handle_one()

        def do_HEAD(self):
            self.handle_one()

        def do_POST(self):
            self.handle_one()

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A reset or a client hanging up mid-response is expected here.
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--upstream-ca", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--reset-after", type=int)
    p.add_argument("--reset-match", default="/blobs/")
    p.add_argument("--reset-times", type=int, default=1)
    p.add_argument("--fail-status", type=int)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--fail-match", default="/")
    args = p.parse_args()

    upstream_ctx = ssl.create_default_context(cafile=args.upstream_ca)
    upstream_ctx.check_hostname = False  # the registry is reached by an address its cert may lack
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(args.cert, args.key)
    log = open(args.log, "a")
    host, port = args.listen.rsplit(":", 1)
    srv = Server((host, int(port)), make_handler(args, Faults(args), log, threading.Lock(), upstream_ctx))
    # The handshake happens in the handler thread, on the first read.
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    srv.serve_forever()


if __name__ == "__main__":
    main()
