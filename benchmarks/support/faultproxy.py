"""A fault-injecting HTTP proxy on loopback, between an S3 client and a (moto) server.

Lives with the benchmarks (which add latency with it) so that they run from an installed package,
outside the repository; the tests use it through ``tests.support.faultproxy``.

Point the client's ``endpoint_url`` at ``proxy.endpoint``; every request is forwarded to the
upstream server, and a seeded random draw decides what goes wrong with it:

- ``latency``: seconds added to every request before it is forwarded (concurrent requests wait
  concurrently, like a network round trip);
- ``error_rate``: the fraction answered ``503 SlowDown`` without reaching the server;
- ``reset_rate``: the fraction whose response is cut by a TCP reset after half of the body;
- ``truncate_rate``: the fraction whose response body stops halfway and the connection closes
  cleanly, although the headers promised the full length;
- ``deny``: path prefixes (``/bucket/key-prefix``) always answered ``403 AccessDenied``;
- ``match``: when set, only requests whose ``"METHOD /path?query"`` contains it get the random
  faults (e.g. ``"partNumber="``: multipart part uploads only);
- ``fail_first``: the first N matching requests are answered ``503``, deterministically.

The proxy is thread-based (one thread per client connection, at most ``max_connections``), keeps
one upstream connection per client connection, and stops itself after ``lifetime`` seconds if
nobody stops it first. ``counts`` says what it injected. Faults can be changed while it runs
(``proxy.faults = Faults(...)``), e.g. to set up data cleanly and then break the reads.

It also runs as a process (``python -m benchmarks.support.faultproxy --upstream URL --latency 0.02``):
it prints its port, serves until stdin closes, and answers ``GET /__faultproxy__/counts`` with its
counters as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

CONTROL = "/__faultproxy__/counts"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True, kw_only=True)
class Faults:
    latency: float = 0.0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    deny: tuple[str, ...] = ()
    match: str = ""
    fail_first: int = 0

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.reset_rate, self.truncate_rate)
        if self.latency < 0 or any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"invalid faults {self}")

    @classmethod
    def mixed(cls, rate: float, latency: float = 0.0) -> Faults:
        """``rate`` of all requests faulty, split evenly between 503s, resets and truncations."""
        return cls(latency=latency, error_rate=rate / 3, reset_rate=rate / 3, truncate_rate=rate / 3)


def _xml_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue handled for us
    server: _Server
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == CONTROL:
            self._send(
                200, [("Content-Type", "application/json")], json.dumps(self.server.proxy.counts).encode()
            )
            return
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def _relay(self) -> None:
        proxy = self.server.proxy
        faults = proxy.faults
        body = self._request_body()
        proxy.count("requests")
        if any(self.path.startswith(p) for p in faults.deny):
            proxy.count("denied")
            self._send(
                403, [("Content-Type", "application/xml")], _xml_error("AccessDenied", "Access Denied")
            )
            return
        if faults.latency:
            time.sleep(faults.latency)
        if faults.match and faults.match not in f"{self.command} {self.path}":
            status, reason, headers, payload = self._forward(body)
            self._send(status, headers, payload, reason=reason)
            return
        draw = proxy.draw()
        if proxy.count("matched") <= faults.fail_first or draw < faults.error_rate:
            proxy.count("errors_503")
            self._send(
                503,
                [("Content-Type", "application/xml")],
                _xml_error("SlowDown", "Please reduce your request rate."),
            )
            return
        status, reason, headers, payload = self._forward(body)
        draw -= faults.error_rate
        if draw < faults.reset_rate:
            proxy.count("resets")
            self._cut(status, reason, headers, payload, reset=True)
        elif draw - faults.reset_rate < faults.truncate_rate:
            proxy.count("truncations")
            self._cut(status, reason, headers, payload, reset=False)
        else:
            self._send(status, headers, payload, reason=reason)

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn: http.client.HTTPConnection | None = self.upstream
        for attempt in range(2):  # a kept-alive upstream connection may have gone stale
            if conn is None:
                host, port = self.server.proxy.upstream
                conn = http.client.HTTPConnection(host, port, timeout=60)
                self.upstream = conn
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt:
                    raise
                continue
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS]
            if resp.will_close:
                conn.close()
                self.upstream = None
            return resp.status, resp.reason, headers, payload
        raise AssertionError("unreachable")

    def _send(
        self, status: int, headers: list[tuple[str, str]], payload: bytes, reason: str | None = None
    ) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() != "content-length" or self.command == "HEAD":
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _cut(
        self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes, *, reset: bool
    ) -> None:
        """Promise the whole body, send half of it (nothing when it is tiny), then drop the line."""
        if len(payload) >= 2 and self.command != "HEAD":
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
        self.close_connection = True
        sock = self.connection
        if reset:  # SO_LINGER 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        sock.close()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        if self.upstream is not None:
            self.upstream.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A client opening dozens of connections at once must not overflow the listen backlog: dropped
    # SYNs are retried by the kernel only after 1, 3, 7 s, which looks like a hang.
    request_queue_size = 512
    proxy: FaultProxy

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded: refuse a connection beyond the limit rather than grow threads without end.
        if not self.proxy.slots.acquire(timeout=5):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy.slots.release()


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        faults: Faults | None = None,
        *,
        seed: int = 0,
        max_connections: int = 256,
        lifetime: float = 900.0,
        io_timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults = faults or Faults()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.lifetime = lifetime
        self._counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.io_timeout = io_timeout

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def injected(self) -> int:
        c = self.counts
        return sum(c.get(k, 0) for k in ("errors_503", "resets", "truncations"))

    def count(self, name: str) -> int:
        with self._lock:
            self._counts[name] += 1
            return self._counts[name]

    def draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"timeout": self.io_timeout})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fault-injecting HTTP proxy on 127.0.0.1")
    p.add_argument("--upstream", required=True)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0, help="503s, resets and truncations, evenly")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with FaultProxy(a.upstream, Faults.mixed(a.fault_rate, a.latency), seed=a.seed) as proxy:
        print(proxy.endpoint.rsplit(":", 1)[1], flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
