"""Hostile input to the image path (issue 11): where the token goes, redirects, passwords in URLs,
a server trickling bytes. Real HTTP servers on 127.0.0.1 record what reached them."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

import pytest

from backend.errors import HostNotAllowed, ImageUnavailable, InvalidRequest
from backend.pipeline.images import ImageFetcher
from backend.settings import Settings, SettingsError
from tests.conftest import TOKEN, ImageServer, make_image

PNG = make_image(40, 30)


@pytest.fixture
def other_server():
    """Another host:port: not Label Studio, not allowed unless a test says so."""
    server = ImageServer()
    yield server
    server.stop()


def fetcher(ls, **changes) -> ImageFetcher:
    settings = Settings(label_studio_url=ls.url, label_studio_api_key=TOKEN, image_timeout=5.0)
    return ImageFetcher(settings.replace(**changes))


def tokens_seen(server: ImageServer) -> list[str]:
    return [auth for _, auth in server.requests if auth]


@pytest.mark.parametrize("template", [
    "http://localhost:{other}\\@127.0.0.1:{ls}/data/a.png",   # the finding: urlsplit sees 127.0.0.1:{ls}
    "http://127.0.0.1:{ls}\\@localhost:{other}/data/a.png",
    "http://localhost:{other}\t@127.0.0.1:{ls}/data/a.png",
    "http://localhost:{other}\r\n@127.0.0.1:{ls}/data/a.png",
])
def test_the_token_never_reaches_a_host_hidden_in_an_ambiguous_url(image_server, other_server, template):
    image_server.add("/data/a.png", PNG)
    other_server.add("/data/a.png", PNG)
    url = template.format(other=other_server.port, ls=image_server.port)
    with pytest.raises(InvalidRequest):
        fetcher(image_server, allowed_image_hosts=("localhost",)).fetch(url)
    assert tokens_seen(other_server) == [] and other_server.requests == []


def test_userinfo_does_not_make_another_host_look_like_label_studio(image_server, other_server):
    other_server.add("/data/a.png", PNG)
    url = f"http://127.0.0.1:{image_server.port}@localhost:{other_server.port}/data/a.png"
    with pytest.raises(HostNotAllowed, match=f"localhost:{other_server.port}"):
        fetcher(image_server).fetch(url)
    assert other_server.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_a_host_that_is_not_allowed_is_refused(image_server, other_server, status):
    other_server.add("/secret.png", PNG)
    image_server.redirects["/data/r.png"] = (status, f"http://localhost:{other_server.port}/secret.png")
    with pytest.raises(HostNotAllowed, match=f"localhost:{other_server.port}"):
        fetcher(image_server).fetch("/data/r.png")
    assert other_server.requests == []


@pytest.mark.parametrize("status", [301, 302, 307])
def test_a_click_on_an_image_redirected_to_another_port_is_a_403(settings, make_client, image_server, other_server,
                                                                     status):
    # the case: Label Studio's origin (allowed) redirects to another port of the same host
    other_server.add("/internal.png", PNG)
    image_server.redirects["/data/upload/1/a.png"] = (status, f"http://127.0.0.1:{other_server.port}/internal.png")
    c, _ = make_client(settings)
    response = c.post("/predict", json=keypoint_body())
    assert response.status_code == 403 and f"127.0.0.1:{other_server.port}" in response.json["error"]
    assert other_server.requests == []


def test_a_redirect_between_allowed_hosts_works_without_forwarding_the_token(image_server, other_server):
    other_server.add("/cdn/a.png", PNG)
    image_server.redirects["/data/r.png"] = (302, f"http://localhost:{other_server.port}/cdn/a.png")
    got = fetcher(image_server, allowed_image_hosts=("localhost",)).fetch("/data/r.png")
    assert got == PNG
    assert tokens_seen(image_server) == [f"Token {TOKEN}"]  # the first hop is Label Studio's
    assert tokens_seen(other_server) == []  # the token stays with Label Studio


def test_a_protocol_relative_url_is_the_host_browsers_read_it_as(image_server, other_server):
    # "//host/a.png" in task data is another host to the annotator's browser; it was fetched from
    # Label Studio's origin, with the token, as a path
    other_server.add("/a.png", PNG)
    with pytest.raises(HostNotAllowed, match=f"localhost:{other_server.port}"):
        fetcher(image_server).fetch(f"//localhost:{other_server.port}/a.png")
    assert fetcher(image_server, allowed_image_hosts=("localhost",)).fetch(f"//localhost:{other_server.port}/a.png") == PNG
    assert image_server.requests == [] and tokens_seen(other_server) == []


def test_redirect_loops_end(image_server):
    image_server.redirects["/data/loop.png"] = (302, "/data/loop.png")
    with pytest.raises(ImageUnavailable, match="redirected more than"):
        fetcher(image_server).fetch("/data/loop.png")


def test_a_password_in_an_image_url_appears_in_no_message_or_log(image_server, caplog):
    caplog.set_level(logging.DEBUG)
    for malformed in ("http:/user:pa55word@localhost/a.png", "http:\\\\user:pa55word@localhost/a.png",
                      "http:///user:pa55word@localhost/a.png"):
        with pytest.raises(InvalidRequest) as refused:
            fetcher(image_server).fetch(malformed)
        assert "pa55word" not in refused.value.message and "***@" in refused.value.message
    url = f"http://user:pa55word@localhost:{image_server.port}/a.png"
    with pytest.raises(HostNotAllowed) as refused:
        fetcher(image_server).fetch(url)
    assert "pa55word" not in refused.value.message
    with pytest.raises(ImageUnavailable) as missing:  # allowed host, missing file: the 404 message
        fetcher(image_server, allowed_image_hosts=("localhost",)).fetch(url)
    assert "pa55word" not in missing.value.message
    assert "pa55word" not in caplog.text


def test_image_timeout_bounds_the_whole_download(image_server):
    # each byte arrives well within the timeout, the whole image does not: a trickling server
    # used to hold a thread for as long as it liked
    image_server.add("/slow.png", PNG)
    image_server.trickle["/slow.png"] = 0.2
    start = time.monotonic()
    with pytest.raises(ImageUnavailable, match="IMAGE_TIMEOUT"):
        fetcher(image_server, allowed_image_hosts=("127.0.0.1",), image_timeout=1.0).fetch(image_server.url + "/slow.png")
    assert time.monotonic() - start < 10  # generous: the bound is about one IMAGE_TIMEOUT


# ---------------------------------------------------------------- /setup


def keypoint_body(image: str = "/data/upload/1/a.png") -> dict:
    from tests.conftest import protocol_body

    body = protocol_body("predict_interactive_keypointlabels.json")
    body["tasks"][0]["data"]["image"] = image
    return body


@pytest.mark.parametrize("configured", [False, True])
def test_an_unauthenticated_setup_cannot_move_downloads(settings, make_client, image_server, other_server, configured):
    # basic auth off (the default): anyone who reaches the port can call /setup. Without
    # LABEL_STUDIO_URL (the default install) its hostname became the Label Studio host and an allowed
    # origin: relative image URLs, and absolute ones naming it, were then fetched from there
    image_server.add("/data/upload/1/a.png", PNG)
    other_server.add("/data/upload/1/a.png", PNG)
    if not configured:
        settings = settings.replace(label_studio_url=None, label_studio_api_key=None)
    c, _ = make_client(settings)
    from tests.conftest import protocol_body

    hostile = protocol_body("setup.json")
    hostile.update(hostname=other_server.url, access_token="attacker-token")
    assert c.post("/setup", json=hostile).status_code == 200  # answered, but changes nothing
    relative = c.post("/predict", json=keypoint_body())
    absolute = c.post("/predict", json=keypoint_body(other_server.url + "/data/upload/1/a.png"))
    assert absolute.status_code == 403 and f"127.0.0.1:{other_server.port}" in absolute.json["error"]
    if configured:  # the image came from LABEL_STUDIO_URL, with its token
        assert relative.status_code == 200
        assert image_server.requests[-1] == ("/data/upload/1/a.png", f"Token {TOKEN}")
    else:
        assert relative.status_code == 503 and "LABEL_STUDIO_URL" in relative.json["error"]
    # nor through Redis, for the other workers
    c2, _ = make_client(settings)
    assert c2.post("/predict", json=keypoint_body()).status_code == relative.status_code
    assert other_server.requests == []


def test_without_label_studio_url_or_basic_auth_setup_is_not_taken(settings, make_client, image_server):
    image_server.add("/data/upload/1/a.png", PNG)
    c, _ = make_client(settings.replace(label_studio_url=None, label_studio_api_key=None))
    from tests.conftest import protocol_body

    setup = protocol_body("setup.json")
    setup.update(hostname=image_server.url, access_token=TOKEN)
    assert c.post("/setup", json=setup).status_code == 200
    refused = c.post("/predict", json=keypoint_body())
    assert refused.status_code == 503 and "LABEL_STUDIO_URL" in refused.json["error"]
    assert image_server.requests == []


@pytest.mark.parametrize("field, value", [("hostname", "http://h\ud800/"), ("access_token", "tok\ud800en"),
                                          ("hostname", "http://h/\r\nX-Forged: 1"), ("access_token", "tok\u20acn")])
def test_setup_with_unprintable_values_is_a_clear_400(client, field, value):
    from tests.conftest import protocol_body

    c, _ = client
    setup = protocol_body("setup.json")
    setup.update(hostname="http://127.0.0.1:1", access_token="t")
    setup[field] = value
    response = c.post("/setup", json=setup)
    assert response.status_code == 400 and field in response.json["error"]


# ---------------------------------------------------------------- more ways to hold a thread or leak a credential


class TricklingHeaders:
    """A host that answers with a status line, then one header byte every `pause` seconds: each read
    is quick, the answer never completes. requests reads headers before any body check can run."""

    def __init__(self, pause: float = 0.2, lasts: float = 60.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.pause, self.lasts = pause, lasts
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    end = time.monotonic() + self.lasts
                    while time.monotonic() < end and not self.stopped.is_set():
                        conn.sendall(b"a")
                        time.sleep(self.pause)
                    conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass  # the client gave up: what the test wants

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_headers_trickled_slower_than_image_timeout_end_the_download(image_server):
    slow = TricklingHeaders()
    try:
        start = time.monotonic()
        with pytest.raises(ImageUnavailable, match="IMAGE_TIMEOUT"):
            fetcher(image_server, allowed_image_hosts=("127.0.0.1",), image_timeout=1.0).fetch(
                f"http://127.0.0.1:{slow.port}/a.png")
        assert time.monotonic() - start < 10  # generous: the bound is about one IMAGE_TIMEOUT
    finally:
        slow.stop()


class CookieServer:
    """An HTTP host that sets a cookie on every answer (as a Label Studio session might) and records
    the Cookie and Authorization headers it receives."""

    def __init__(self):
        self.seen: list[tuple[str | None, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append((self.headers.get("Cookie"), self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Set-Cookie", "sessionid=ls-session-secret; Path=/")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cookies_from_label_studio_never_reach_another_origin():
    # cookies ignore ports: one Label Studio set on 127.0.0.1:A went to 127.0.0.1:B with the next download
    ls, other = CookieServer(), CookieServer()
    try:
        images = fetcher(ls, allowed_image_hosts=("127.0.0.1",))
        assert images.fetch("/data/a.png") == PNG
        assert images.fetch(f"{other.url}/b.png") == PNG
        assert images.fetch("/data/a.png") == PNG
        assert other.seen == [(None, None)]  # neither Label Studio's cookie nor its token
        assert all(cookie is None for cookie, _ in ls.seen)  # nor do cookies come back to Label Studio
    finally:
        ls.stop()
        other.stop()


@pytest.mark.parametrize("name", ["LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "WEBHOOK_SECRET"])
@pytest.mark.parametrize("value", ["tok\udcffen", "tok\nen", "t\u00f6ken"])
def test_a_secret_that_cannot_be_a_header_stops_the_backend_at_start(name, value):
    # an undecodable byte in the environment arrives as a lone surrogate: encoding it for the
    # Authorization header (or comparing it) failed every click with a 500 instead
    env = {name: value, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"} | {name: value}
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)
