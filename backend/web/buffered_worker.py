"""BufferingThreadWorker: a gunicorn gthread worker that reads each request whole before a thread sees it.

gunicorn's gthread worker hands a connection to a thread as soon as its first bytes arrive; the
thread then reads the headers and the body with blocking reads and no deadline. A client that
trickles its body (a slow link, or on purpose) holds that thread until it finishes: with THREADS
such clients every click waited. gunicorn has no setting for it (its advice is a buffering proxy
in front; since 24 it only defers connections that send nothing for 5 s). This worker is that
buffer: the main loop, which already polls every idle connection, reads requests without blocking
until the head and the whole body (Content-Length or chunked) are in memory, then puts the bytes
back in front of gunicorn's own parser and gives the connection to a thread, which parses and
answers them without waiting on the client. A request that is not whole REQUEST_READ_TIMEOUT
seconds after its first byte is answered 408 and closed; a body announced larger than
MAX_REQUEST_BYTES is answered 413 before it is read. Parsing stays gunicorn's: anything this
framing does not understand is handed to the parser as it is, which answers 400.

TLS and the PROXY protocol read the socket before HTTP starts: with them this worker behaves as
gthread does (terminate TLS at a proxy).
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

from backend.settings import Settings

READ_SIZE = 256 * 1024
HEAD_END = b"\r\n\r\n"
LINGER = 2.0  # seconds a refused connection is read from before it is closed

COMPLETE, MORE, PARSER = "complete", "more", "parser"  # what the bytes so far are: see framing()


def framing(data: bytes | bytearray, head_limit: int, body_limit: int) -> tuple[str, int | None]:
    """Whether `data` holds one whole request (COMPLETE), needs MORE bytes, or should go to gunicorn's
    parser as it is (PARSER: malformed or over a limit; the parser answers it). The second value is
    the announced body size when it exceeds `body_limit` (the caller answers 413), else None."""
    end = data.find(HEAD_END)
    if end < 0:
        return (PARSER if len(data) > head_limit else MORE), None
    if end > head_limit:
        return PARSER, None
    length, chunked = None, False
    for line in bytes(data[:end]).split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return PARSER, None
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return PARSER, None
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if chunked:
        return _chunked(data, end + len(HEAD_END), body_limit)
    if length is None:
        return COMPLETE, None  # a request without a body
    if length > body_limit:
        return PARSER, length
    return (COMPLETE if len(data) >= end + len(HEAD_END) + length else MORE), None


def _chunked(data: bytes | bytearray, pos: int, body_limit: int) -> tuple[str, int | None]:
    """Walk the chunks from `pos`: whole when the last chunk and the trailers' blank line are in."""
    total = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return (PARSER if len(data) - pos > 1024 else MORE), None
        size_text = bytes(data[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return PARSER, None
        total += size
        if total > body_limit:
            return PARSER, total
        pos = line_end + 2
        if size == 0:  # trailers, then a blank line
            if data[pos:pos + 2] == b"\r\n":
                return COMPLETE, None
            return (COMPLETE if data.find(HEAD_END, pos - 2) >= 0 else MORE), None
        if len(data) < pos + size + 2:
            return MORE, None
        pos += size + 2


def error_response(status: str, message: str) -> bytes:
    """The backend's error shape ({"status": "error", "error": ...}) for answers given before the app runs."""
    body = json.dumps({"status": "error", "error": message}).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


class BufferingThreadWorker(ThreadWorker):
    """gthread with whole requests read in the main loop (see the module's docstring)."""

    def init_process(self):
        settings = Settings.from_env()
        self.read_timeout = settings.request_read_timeout
        self.body_limit = settings.max_request_bytes
        cfg = self.cfg
        # gunicorn's own limits on the request line and header fields, plus their line ends
        self.head_limit = cfg.limit_request_line + cfg.limit_request_fields * (cfg.limit_request_field_size + 2) + 4
        self.buffering = not cfg.is_ssl and getattr(cfg, "proxy_protocol", "off") in ("off", False, None)
        self.reading: dict = {}  # connection -> when it is cut off
        super().init_process()

    def enqueue_req(self, conn):
        """Every way a connection reaches a thread passes here: new, kept alive, or read-ahead."""
        if not self.buffering or getattr(conn, "inbox", None) is not None:
            super().enqueue_req(conn)
            return
        # bytes gunicorn already holds (read ahead behind the last request) start the next one
        conn.inbox = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        conn.continued = conn.lingering = False
        conn.sock.setblocking(False)
        if self._ready(conn):
            return
        # no byte yet: an idle connection, kept as long as keep-alive allows; from the first byte on,
        # the request has REQUEST_READ_TIMEOUT to arrive whole
        self.reading[conn] = time.monotonic() + (self.read_timeout if conn.inbox else self.cfg.keepalive)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))

    def on_request_bytes(self, conn, _sock):
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away, or finished sending after a refusal
            self._stop_reading(conn)
            self._close(conn)
            return
        if conn.lingering:  # a refused request's rest: read and dropped, so the refusal is not reset
            return
        if not conn.inbox:
            self.reading[conn] = time.monotonic() + self.read_timeout
        conn.inbox += data
        if not self._ready(conn, registered=True):
            self._continue(conn)

    def _ready(self, conn, registered: bool = False) -> bool:
        """Hand the connection on (to a thread, or a refusal) once its bytes allow; False: read more."""
        if not conn.inbox:
            return False
        state, announced = framing(conn.inbox, self.head_limit, self.body_limit)
        if state == MORE:
            return False
        if announced is not None:
            if not registered:
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
            self._refuse(conn, "413 Content Too Large",
                         f"the request body is larger than MAX_REQUEST_BYTES={self.body_limit}")
            return True
        if registered:
            self._stop_reading(conn)  # before a thread touches the socket
        super().enqueue_req(conn)  # the thread puts conn.inbox back in front of the parser (handle)
        return True

    def _continue(self, conn) -> None:
        """A client that sent `Expect: 100-continue` waits for this before its body (curl does, 1 s)."""
        if conn.continued or HEAD_END not in conn.inbox:
            return
        head = bytes(conn.inbox[:conn.inbox.find(HEAD_END)]).lower()
        if b"\r\nexpect:" in head and b"100-continue" in head:
            conn.continued = True
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def handle(self, conn):
        """In a thread: the whole request is in memory; gunicorn's parser reads it from there."""
        inbox = getattr(conn, "inbox", None)
        if inbox is not None:
            conn.inbox = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(inbox))
        return super().handle(conn)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.reading.items()):
            if now < deadline and (self.alive or conn.inbox):
                continue
            if conn.inbox and not conn.lingering:
                self._refuse(conn, "408 Request Timeout",
                             f"the request did not arrive whole within REQUEST_READ_TIMEOUT={self.read_timeout:g} s")
            else:
                self._stop_reading(conn)
                self._close(conn)

    def _stop_reading(self, conn) -> None:
        if self.reading.pop(conn, None) is not None:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _refuse(self, conn, status: str, message: str) -> None:
        """Answer, stop sending, and read what the client still sends for a moment before closing:
        closing with unread bytes would reset the connection and the client might never see the answer."""
        try:
            conn.sock.send(error_response(status, message))  # small: fits the socket's buffer
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.lingering = True
        self.reading[conn] = time.monotonic() + LINGER

    def _close(self, conn) -> None:
        conn.inbox = None
        self.nr_conns -= 1
        conn.close()
