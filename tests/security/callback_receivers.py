"""Callback receivers on 127.0.0.1 for the security tests: a healthy one, and the ways a receiver can
hold a sender -- trickling its answer, answering forever, never accepting the connection."""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOPBACK = ("127.0.0.1", "::1")


class Receiver:
    """An HTTP server on `host`; `behaviour` is "ok", "trickle" (the status line, a byte a second),
    "endless" (a 200 whose body never ends) or a number of seconds to hold the answer before a 204."""

    def __init__(self, behaviour: str | float = "ok", host: str = "127.0.0.1", port: int = 0) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.connections = 0
        self.active = self.most_active = 0  # connections open at once, and the most there ever were
        self.finished = threading.Event()  # set when a trickle or endless answer was cut by its sender
        self._closing = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                with receiver.lock:
                    receiver.connections += 1
                    receiver.active += 1
                    receiver.most_active = max(receiver.most_active, receiver.active)
                super().setup()

            def finish(self) -> None:
                with receiver.lock:
                    receiver.active -= 1
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                try:
                    receiver.answer(self)
                except OSError:  # the sender hung up: what the attack tests want
                    receiver.finished.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.behaviour = behaviour
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.url = f"http://{host}:{self.port}/hooks/xrayq"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if self.behaviour == "trickle":
            for byte in b"HTTP/1.1 200 OK\r\n" * 600:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                if self._closing.wait(1.0):  # a byte a second, until the sender hangs up
                    return
        elif self.behaviour == "endless":
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.end_headers()
            while not self._closing.is_set():
                handler.wfile.write(b"x" * 65536)
        else:
            if not isinstance(self.behaviour, str):
                self._closing.wait(self.behaviour)
            handler.send_response(204)
            handler.end_headers()

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


class Blackhole:
    """A port on 127.0.0.1 that never completes a connection (a listening socket whose accept queue
    is full), as an unroutable address behaves: a connect hangs until its sender gives up."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/xrayq"
        self.fillers = []
        for _ in range(2):  # fill the accept queue: later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self.fillers.append(filler)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(select.select([], self.fillers, [], 0.1)[1]) < 1:
            pass

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.listener.close()


class OutboundGuard:
    """Records every socket connect this process makes while armed, and refuses any that is not to a
    loopback address: a test that checks a refusal of 169.254.169.254 or 10.0.0.1 can never reach it,
    even when the code under test is broken. (A `sys.addaudithook` hook: it stays for the process.)"""

    def __init__(self) -> None:
        self.armed = False
        self.attempts: list[Any] = []
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event != "socket.connect":
            return
        address = args[1]
        self.attempts.append(address)
        if isinstance(address, tuple) and address[0] not in LOOPBACK and not str(address[0]).startswith("127."):
            raise ConnectionRefusedError(f"test guard: no connection outside loopback ({address[0]})")

    @contextlib.contextmanager
    def watching(self):
        self.attempts.clear()
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False

    def reached(self, host: str) -> bool:
        return any(isinstance(address, tuple) and address[0] == host for address in self.attempts)


GUARD = OutboundGuard()
