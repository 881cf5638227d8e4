"""Property-based fuzzing (hypothesis) of what anyone who reaches the backend can send (issue 11):
/predict, /setup and /webhook bodies through the real app (no answer >= 500), and image URLs (the
host:port the allowlist checks is the one the HTTP client connects to, and Label Studio's token
reaches no other server, whatever the URL)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import requests
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from backend.errors import BackendError, InvalidRequest
from backend.pipeline.images import ImageFetcher, _origin
from backend.settings import Settings
from tests.conftest import TOKEN, ImageServer, make_image, protocol_body

KEYPOINT = "predict_interactive_keypointlabels.json"
PNG = make_image(48, 36)

# values a hostile caller tries: URL confusions, log-line breakers, lone surrogates, odd numbers
HOSTILE_STRINGS = (
    "http://localhost:1\\@127.0.0.1:2/a.png", "http://u:pa55word@127.0.0.1:1/a.png", "http://[::1/a.png",
    "http://h:99999/a.png", "http://h:-1/", "/data/upload/1/a.png\r\nX-Forged: 1", "\ud800", "a\udfff",
    "PROJECT_CREATED\n", "TASKS_CREATED", "ANNOTATION_CREATED", "START_TRAINING", "\u00b2", "111111111111111",
    "1.2.3", "<View/>", "<svg/>", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "\x00", "%00",
)

_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(HOSTILE_STRINGS)
           | st.text(st.characters(categories=["Cs", "Cc", "Zl", "Zp"]), max_size=4))
_json = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _mutations(base: dict):
    """The recorded Label Studio body with one field replaced by anything."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node[:2]):
                walk(value, path + (i,))

    walk(base, ())

    @st.composite
    def mutated(draw):
        out = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 2))):  # one field, sometimes two
            path = draw(st.sampled_from(paths[1:]))
            node = out
            try:
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = draw(_json)
            except (KeyError, IndexError, TypeError):
                pass  # the first change replaced this path's parent
        return out

    return mutated()


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.function_scoped_fixture]


def base_body(name: str) -> dict:
    if name == "TASKS_CREATED":  # no recording of one: its documented shape, with the project's config
        config = protocol_body(KEYPOINT)["label_config"]
        return {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": config},
                "tasks": [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in (1, 2)]}
    return protocol_body(name)


@pytest.mark.parametrize("route, name, cases", [
    ("/predict", KEYPOINT, 500), ("/predict", "predict_interactive_rectanglelabels.json", 200),
    ("/predict", "predict_batch.json", 300), ("/setup", "setup.json", 500),
    ("/webhook", "webhook_annotation_created.json", 300), ("/webhook", "TASKS_CREATED", 200),
    ("/webhook", None, 200),
])
def test_fuzzed_bodies_never_get_a_5xx(client, image_server, route, name, cases):
    # every path of the image server answers with an image: a 5xx can only come from our side
    image_server.default = PNG
    c, _ = client
    seen = []
    strategy = _mutations(base_body(name)) if name else _json

    @hsettings(max_examples=cases, deadline=None, database=None, suppress_health_check=_HEALTH)
    @given(strategy)
    def fuzz(raw):
        response = c.post(route, data=json.dumps(raw), content_type="application/json")
        seen.append(response.status_code)
        assert response.status_code < 500, (raw, response.json)

    fuzz()
    print(f"fuzz {route} {name}: {len(seen)} cases, {sum(s >= 500 for s in seen)} answers >= 500")
    assert len(seen) >= cases * 0.9  # hypothesis ran (nearly) all the cases asked for


# ---------------------------------------------------------------- image URLs

_SCHEMES = ("http://", "HTTP://", "https://", "http:/", "http:\\\\", "//", "", "ftp://", "file://")
_PIECES = (
    "localhost", "LOCALHOST", "127.0.0.1", "{ls}", "{other}", ":", "@", "\\", "/", "[", "]", "[::1]", "%40",
    "%5C", "#", "?", " ", "\t", "\r\n", "user", "user:pa55word@", ".", "\u3002", "\u00df", "\uff20", "\u2100", "0x7f.1",
    "2130706433", ":0", ":99999", ":-1", ":+80", "\x00", "\ud800", "\u0130", "..", ";", "&", "=",
)


_AUTHORITIES = ("{ls}", "{other}", "localhost", "127.0.0.1", "user:pa55word@{ls}", "{ls}@{other}", "{other}\\@{ls}",
                "[::1]:1", "localhost:{other_port}")


@st.composite
def hostile_urls(draw, ls: str, other: str) -> str:
    """URL-shaped strings: a plausible authority with up to three of the pieces parsers disagree on
    inserted anywhere (mostly valid URLs, so the checks after parsing are exercised too)."""
    text = draw(st.sampled_from(_SCHEMES)) + draw(st.sampled_from(_AUTHORITIES))
    text += draw(st.sampled_from(("/data/a.png", "/a.png", "", "/data/a.png?token=x#f")))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(_PIECES)) + text[at:]
    return text.replace("{ls}", ls).replace("{other}", other).replace("{other_port}", other.rpartition(":")[2])


def test_the_host_checked_is_the_host_the_client_connects_to():
    # the allowlist and the token decision read (scheme, host, port) with _origin; requests, asked to
    # fetch the same URL, must connect to exactly that, or _origin must refuse the URL
    session = requests.Session()
    checked = []

    @hsettings(max_examples=1500, deadline=None, database=None, suppress_health_check=_HEALTH)
    @given(hostile_urls("127.0.0.1:8080", "localhost:9090"))
    def same_target(url):
        try:
            scheme, host, port = _origin(url)
        except InvalidRequest:
            return
        if scheme not in ("http", "https"):
            return  # refused by ImageFetcher.resolve, never fetched
        prepared = session.prepare_request(requests.Request("GET", url))
        pool = session.get_adapter(prepared.url).get_connection_with_tls_context(prepared, verify=True)
        assert (pool.host.lower(), pool.port) == (host, port), url
        checked.append(url)

    same_target()
    assert len(checked) > 100  # the property was exercised on URLs _origin accepted, not only refused


def test_no_url_sends_label_studio_s_token_to_another_server(image_server, caplog):
    # Label Studio at 127.0.0.1:A; another server at 127.0.0.1:B / localhost:B, and "localhost" is an
    # allowed image host, so URLs reach it: whatever the URL, the token never does, and a password
    # in it appears in no message or log line
    caplog.set_level(logging.DEBUG)
    other = ImageServer()
    try:
        image_server.default = other.default = PNG
        ls_port, other_port = str(image_server.port), str(other.port)
        settings = Settings(label_studio_url=image_server.url, label_studio_api_key=TOKEN, image_timeout=2.0,
                            allowed_image_hosts=("localhost",))
        fetcher = ImageFetcher(settings)
        fetched = []

        @hsettings(max_examples=400, deadline=None, database=None, suppress_health_check=_HEALTH)
        @given(hostile_urls(f"127.0.0.1:{ls_port}", f"localhost:{other_port}"))
        def no_leak(url):
            before, logged = len(other.requests), len(caplog.records)
            # a password, when the pieces left "user:pa55word@" whole (a "/" inserted into it makes
            # "pa55word" part of a path, not a password)
            password = "user:pa55word@" in url
            try:
                fetched.append(fetcher.fetch(url))
            except BackendError as exc:
                assert not (password and "pa55word" in exc.message), url
            assert not (password and any("pa55word" in r.getMessage() for r in caplog.records[logged:])), url
            # (a URL's own userinfo may reach it as Basic auth: the caller's credentials, not ours)
            assert [auth for _, auth in other.requests[before:] if auth and TOKEN in auth] == [], url

        no_leak()
        assert other.requests  # the other server was reached by some URLs, without the token
        assert any(auth == f"Token {TOKEN}" for _, auth in image_server.requests)  # and Label Studio with it
    finally:
        other.stop()
