"""A fault-injecting HTTP proxy for S3 tests: flaky object storage on 127.0.0.1, in front of moto.

:class:`FaultyProxy` listens on a free loopback port and forwards every request to ``upstream`` (the moto
server of the ``s3_server`` fixture). A seeded share ``rate`` of requests gets a fault instead:

* ``"503"``: ``503 Slow Down`` with S3's XML error body (``<Code>SlowDown</Code>``), as S3 answers under load;
* ``"drop"``: the connection is closed without a response (the request never reaches the server);
* ``"drop_after"``: the request reaches the server, then the connection is closed before the response
  (the client cannot tell whether a write happened and must retry it safely).

``modes`` picks among them at random per fault. Counters say how many requests and faults there were.
Never sends traffic anywhere but the upstream on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SET_BY_PROXY = {"server", "date", "content-length"}  # send_response adds the first two itself
SLOW_DOWN = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>{id}</RequestId></Error>"
)


class FaultyProxy:
    """A threaded HTTP/1.1 proxy that injects faults into a share of requests (see the module docstring).

    Args:
        upstream: ``http://127.0.0.1:PORT`` of the real server.
        rate: Share of requests that get a fault, in [0, 1].
        modes: Fault kinds to pick from: ``"503"``, ``"drop"``, ``"drop_after"``.
        seed: Seed of the fault draws.
    """

    def __init__(self, upstream: str, rate: float = 0.2, modes: tuple[str, ...] = ("503", "drop"), seed: int = 0):
        parsed = urlparse(upstream)
        if parsed.hostname != "127.0.0.1":
            raise ValueError(f"upstream {upstream}: only 127.0.0.1 is allowed")
        self.upstream_port = parsed.port
        self.rate, self.modes = rate, modes
        self.counts: Counter[str] = Counter()
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def draw(self) -> str | None:
        """Count a request and decide its fault (None: forward it untouched)."""
        with self._lock:
            self.counts["requests"] += 1
            if self._rng.random() >= self.rate:
                return None
            mode = self._rng.choice(self.modes)
            self.counts[mode] += 1
            return mode

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _forward(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    body = self._body()
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    return response.status, response.reason, response.getheaders(), data
                finally:
                    conn.close()

            def _handle(self) -> None:
                fault = proxy.draw()
                if fault == "drop":
                    self._body()
                    self._drop()
                    return
                if fault == "503":
                    self._body()
                    body = SLOW_DOWN.format(id=uuid.uuid4().hex).encode()
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                status, reason, headers, data = self._forward()
                if fault == "drop_after":
                    self._drop()
                    return
                self.send_response(status, reason)
                for key, value in headers:
                    if key.lower() not in HOP_BY_HOP | SET_BY_PROXY:
                        self.send_header(key, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 - http.server's names

        return Handler
