#!/usr/bin/env python3
"""A minimal Docker registry token issuer (distribution's "token" auth), for the test harness only.

GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...] with Basic credentials (or, for
identity tokens, POST /token with grant_type=refresh_token&refresh_token=T) answers
{"token", "access_token", "expires_in"}: an RS256 JWT whose header carries the signing certificate
(x5c), so the registry can check it against its rootcertbundle. Signing uses `openssl dgst`, the
Python standard library has no RSA.

Valid credentials get the actions they ask for; anonymous callers get a token granting nothing
(the registry then answers 401, as Docker Hub does for private repositories); wrong credentials get
401 from the issuer itself.

Usage: token_issuer.py --listen ADDR:PORT --cert CERT --key KEY --users USER:PASS[,USER:PASS]
       [--refresh-token TOKEN] [--service NAME] [--issuer NAME] [--log FILE]
"""

import argparse
import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der_b64(cert_path: str) -> str:
    with open(cert_path, "rb") as f:
        pem = f.read().decode()
    der = ssl.PEM_cert_to_DER_cert(pem)
    return base64.b64encode(der).decode()


class Issuer:
    def __init__(self, args):
        self.args = args
        self.x5c = cert_der_b64(args.cert)
        self.users = dict(u.split(":", 1) for u in args.users.split(",") if u)
        self.lock = threading.Lock()
        self.seq = 0

    def sign(self, payload: bytes) -> bytes:
        # subprocess.run waits for openssl; this runs in the test harness, never under envbox.
        r = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.args.key],
            input=payload,
            capture_output=True,
            check=True,
        )
        return r.stdout

    def mint(self, subject: str, service: str, access: list) -> str:
        now = int(time.time())
        with self.lock:
            self.seq += 1
            jti = f"{os.getpid()}-{self.seq}"
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {
            "iss": self.args.issuer,
            "sub": subject,
            "aud": service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": jti,
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        return signing_input + "." + b64url(self.sign(signing_input.encode()))


def parse_scopes(scopes):
    access = []
    for s in scopes:
        parts = s.split(":")
        if len(parts) < 3:
            continue
        typ, actions = parts[0], parts[-1]
        name = ":".join(parts[1:-1])
        access.append({"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]})
    return access


def make_handler(issuer: Issuer, log):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            log.write("%s %s\n" % (self.address_string(), fmt % a))
            log.flush()

        def reply(self, code, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="token-issuer"')
            self.end_headers()
            self.wfile.write(data)

        def basic_user(self):
            """None: no credentials; False: wrong; else the user name."""
            h = self.headers.get("Authorization", "")
            if not h.lower().startswith("basic "):
                return None
            try:
                user, pw = base64.b64decode(h[6:].strip()).decode().split(":", 1)
            except Exception:
                return False
            return user if issuer.users.get(user) == pw else False

        def grant(self, user, params):
            service = (params.get("service") or [issuer.args.service])[0]
            if service != issuer.args.service:
                return self.reply(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
            access = parse_scopes(params.get("scope", [])) if user else []
            token = issuer.mint(user or "", service, access)
            body = {"token": token, "access_token": token, "expires_in": 300,
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if user and params.get("offline_token") == ["true"] and issuer.args.refresh_token:
                body["refresh_token"] = issuer.args.refresh_token
            self.reply(200, body)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                return self.reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            params = urllib.parse.parse_qs(url.query)
            user = self.basic_user()
            if user is False:
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            self.grant(user, params)

        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                return self.reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            n = int(self.headers.get("Content-Length") or 0)
            params = urllib.parse.parse_qs(self.rfile.read(n).decode())
            grant = (params.get("grant_type") or [""])[0]
            user = None
            if grant == "refresh_token":
                rt = (params.get("refresh_token") or [""])[0]
                if not issuer.args.refresh_token or rt != issuer.args.refresh_token:
                    return self.reply(401, {"error": "invalid_grant"})
                user = next(iter(issuer.users), "user")
            elif grant == "password":
                u = (params.get("username") or [""])[0]
                p = (params.get("password") or [""])[0]
                if issuer.users.get(u) != p:
                    return self.reply(401, {"error": "invalid_grant"})
                user = u
            else:
                return self.reply(400, {"error": "unsupported_grant_type"})
            self.grant(user, params)

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--users", default="")
    p.add_argument("--refresh-token", default="")
    p.add_argument("--service", default="envbox-test-registry")
    p.add_argument("--issuer", default="envbox-test-issuer")
    p.add_argument("--log", default="")
    args = p.parse_args()
    host, port = args.listen.rsplit(":", 1)
    log = open(args.log, "a") if args.log else sys.stderr
    issuer = Issuer(args)
    srv = ThreadingHTTPServer((host, int(port)), make_handler(issuer, log))
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    log.write(f"token issuer listening on {args.listen}\n")
    log.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
