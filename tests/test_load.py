"""Slow clients against a real `sam-backend serve`: a request reaches a gunicorn thread only once it
has arrived whole, so clients trickling their bodies never make a warm click wait."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from backend.web.buffered_worker import COMPLETE, MORE, PARSER, framing
from tests.conftest import TOKEN, free_port, make_image, protocol_body
from tests.test_serve import wait_for

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
SLOW_CLIENTS = 4  # more than the threads: with plain gthread each one held a thread until its body was in
TRICKLE_FOR = 10.0  # seconds each slow client takes to send its body
READ_TIMEOUT = 16.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def head(body_length: int, extra: str = "") -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\n{extra}\r\n").encode()


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes or a whole answer with a body is in."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk
        while data.startswith(CONTINUE):  # interim answers: the final one follows
            data = data[len(CONTINUE):]
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            length = [int(line.split(b":")[1]) for line in data[:end].split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(data) >= end + 4 + length[0]:
                return data


def regions(answer: dict) -> list:
    """The masks and labels of an answer (region ids are new each time)."""
    return [(r["type"], r["value"]) for r in answer["results"][0]["result"]]


def trickle(port: int, payload: bytes, seconds: float, answers: list, done: threading.Event) -> None:
    """Sends a valid click a few bytes at a time over `seconds`, then reads the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head(len(payload)))
        pieces = 20
        step = -(-len(payload) // pieces)
        for i in range(0, len(payload), step):
            sock.sendall(payload[i:i + step])
            time.sleep(seconds / pieces)
        done.set()
        answers.append(read_answer(sock))


def test_slow_clients_hold_no_thread_a_warm_click_answers_while_they_trickle(tiny_checkpoint, image_server, tmp_path):
    image_server.add("/data/local-files/?d=local/img_local.png", make_image(80, 60))
    body = protocol_body("predict_interactive_keypointlabels.json")
    payload = json.dumps(body).encode()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CACHE_REDIS_URL")}
    env.update(SAM_CHECKPOINT=str(tiny_checkpoint), MODEL_DIR=str(tmp_path / "data"), LABEL_STUDIO_URL=image_server.url,
               LABEL_STUDIO_API_KEY=TOKEN, DEVICE="cpu", TORCH_THREADS="1", LOG_LEVEL="WARNING", WARM_WORKERS="0",
               REQUEST_READ_TIMEOUT=str(READ_TIMEOUT), MAX_REQUEST_BYTES="100000")
    proc = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--threads", str(THREADS)],
                            cwd=ROOT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health", proc)
        warm = requests.post(base + "/predict", json=body, timeout=120)  # the cold click: embeds the image
        assert warm.status_code == 200 and warm.json()["results"][0]["result"]

        answers: list[bytes] = []
        finished = [threading.Event() for _ in range(SLOW_CLIENTS)]
        slow = [threading.Thread(target=trickle, args=(port, payload, TRICKLE_FOR, answers, done))
                for done in finished]
        for thread in slow:
            thread.start()
        time.sleep(1.5)  # every slow client has sent its head and the start of its body
        click = requests.post(base + "/predict", json=body, timeout=120)
        still_trickling = sum(not done.is_set() for done in finished)
        assert click.status_code == 200 and regions(click.json()) == regions(warm.json())
        # the warm click was answered while every slow client was still sending: none held a thread
        assert still_trickling == SLOW_CLIENTS
        for thread in slow:
            thread.join(timeout=60)
        # a body that arrived slowly is still a click like any other
        assert len(answers) == SLOW_CLIENTS
        assert all(a.startswith(b"HTTP/1.1 200") and b'"result":[{' in a for a in answers), answers

        # a client that never finishes is answered 408 once REQUEST_READ_TIMEOUT has passed
        with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 30) as sock:
            started = time.monotonic()
            sock.sendall(head(len(payload)) + payload[:100])
            answer = read_answer(sock)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and b"REQUEST_READ_TIMEOUT" in answer, answer
        assert waited >= READ_TIMEOUT - 1

        # a body announced larger than MAX_REQUEST_BYTES: 413 before it is sent
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head(10_000_000))
            answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 413") and b"MAX_REQUEST_BYTES=100000" in answer, answer

        # a client that waits for 100 Continue (curl does) gets it before sending its body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head(len(payload), "Expect: 100-continue\r\n"))
            assert sock.recv(len(CONTINUE)) == CONTINUE
            sock.sendall(payload)
            assert read_answer(sock).startswith(b"HTTP/1.1 200")
        # a chunked body (no Content-Length) is read whole too
        chunked = requests.post(base + "/predict", data=iter([payload[:500], payload[500:]]),
                                headers={"Content-Type": "application/json"}, timeout=60)
        assert chunked.status_code == 200 and regions(chunked.json()) == regions(warm.json())
        # the connection kept alive after a buffered request serves the next one
        session = requests.Session()
        assert [session.post(base + "/predict", json=body, timeout=60).status_code for _ in range(3)] == [200] * 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_framing_tells_a_whole_request_from_a_partial_one():
    limit = 1000
    assert framing(b"GET / HTTP/1.1\r\nHost: x\r\n", 8000, limit) == (MORE, None)
    assert framing(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 8000, limit) == (COMPLETE, None)
    assert framing(head(5) + b"{\"a\"", 8000, limit) == (MORE, None)
    assert framing(head(5) + b"{\"a\":", 8000, limit) == (COMPLETE, None)
    assert framing(head(5000), 8000, limit) == (PARSER, 5000)  # over the limit: 413 before the body
    assert framing(head(5, "Content-Length: 5\r\n"), 8000, limit) == (PARSER, None)  # ambiguous: the parser says 400
    assert framing(b"X" * 9000, 8000, limit) == (PARSER, None)  # a head over gunicorn's limits
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert framing(chunked + b"5\r\nhello\r\n", 8000, limit) == (MORE, None)
    assert framing(chunked + b"5\r\nhello\r\n0\r\n", 8000, limit) == (MORE, None)
    assert framing(chunked + b"5\r\nhello\r\n0\r\n\r\n", 8000, limit) == (COMPLETE, None)
    assert framing(chunked + b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", 8000, limit) == (COMPLETE, None)
    assert framing(chunked + b"zz\r\n", 8000, limit) == (PARSER, None)
    assert framing(chunked + b"800\r\n" + b"a" * 10, 8000, limit) == (PARSER, 2048)
