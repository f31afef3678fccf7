#!/usr/bin/env python3
"""A rate-limiting TCP forwarder for the harness: makes a pull slow enough to be interrupted.

It listens on --listen (ADDR:PORT; port 0 picks a free one, written to --port-file once listening)
and forwards every connection to --upstream, unchanged (TLS passes through, so the registry's own
certificate is seen). The upstream-to-client direction is limited to --rate bytes per second per
connection. The number of bytes sent to clients so far is kept in --count-file (rewritten at most
every 0.1 s), so a test can tell that a blob is in flight.

Usage: slow_proxy.py --listen ADDR:PORT --upstream HOST:PORT --rate BYTES --port-file F --count-file F
"""

import argparse
import os
import socket
import threading
import time

CHUNK = 4096


class Counter:
    def __init__(self, path):
        self.path = path
        self.total = 0
        self.lock = threading.Lock()
        self.last_write = 0.0

    def add(self, n):
        with self.lock:
            self.total += n
            now = time.monotonic()
            if now - self.last_write >= 0.1:
                self.last_write = now
                self._write()

    def _write(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.total}\n")
        os.replace(tmp, self.path)


def pump(src, dst, rate, counter):
    """Copies src to dst; rate (bytes/s) limits when set."""
    started = time.monotonic()
    sent = 0
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
            if rate:
                sent += len(data)
                counter.add(len(data))
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(conn, upstream, rate, counter):
    host, port = upstream.rsplit(":", 1)
    try:
        up = socket.create_connection((host, int(port)))
    except OSError:
        conn.close()
        return
    a = threading.Thread(target=pump, args=(conn, up, 0, counter), daemon=True)
    b = threading.Thread(target=pump, args=(up, conn, rate, counter), daemon=True)
    a.start()
    b.start()
    a.join()
    b.join()
    conn.close()
    up.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--rate", type=int, required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--count-file", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(64)
    counter = Counter(a.count_file)
    counter._write()
    with open(a.port_file + ".tmp", "w") as f:
        f.write(f"{srv.getsockname()[1]}\n")
    os.replace(a.port_file + ".tmp", a.port_file)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, a.upstream, a.rate, counter), daemon=True).start()


if __name__ == "__main__":
    main()
