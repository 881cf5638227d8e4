"""Hostile and malformed input through the real app (issue 11): every case a 4xx naming the problem,
never a 500; webhooks are hints with a cap; /metrics stays bounded. Fuzzing: tests/test_fuzz.py."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging

import numpy as np
import pytest
import redis
from PIL import Image

from backend.errors import UnsupportedInput
from backend.jobs import queues as jobs
from backend.pipeline.images import decode_image
from tests.conftest import protocol_body

KEYPOINT = "predict_interactive_keypointlabels.json"


def body(name: str) -> dict:
    return copy.deepcopy(protocol_body(name))


def webhook(action: str, **extra) -> dict:
    return {"action": action, "project": {"id": 1, "label_config": protocol_body(KEYPOINT)["label_config"]}, **extra}


def test_deeply_nested_json_is_a_400_on_every_route(client):
    c, _ = client
    nested = "[" * 100_000 + "]" * 100_000
    for route in ("/predict", "/setup", "/webhook"):
        response = c.post(route, data=nested, content_type="application/json")
        assert response.status_code == 400, route
        assert "nested" in response.json["error"] or "JSON object" in response.json["error"]


def test_a_body_over_the_limit_is_a_413(settings, make_client):
    c, _ = make_client(settings.replace(max_request_bytes=4096))
    response = c.post("/predict", data=b"{" + b" " * 10_000 + b"}", content_type="application/json")
    assert response.status_code == 413 and "MAX_REQUEST_BYTES=4096" in response.json["error"]


def nested(depth: int):
    value = 50
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [150, 900])
def test_json_nested_past_the_limit_is_a_400_wherever_it_sits(client, depth):
    # shallower than the JSON decoder's own limit: it parses, then a repr() in an error message
    # or a serialiser further on recursed past Python's limit (500)
    c, _ = client
    raw = body(KEYPOINT)
    raw["params"]["context"]["result"][0]["value"]["x"] = nested(depth)
    response = c.post("/predict", data=json.dumps(raw), content_type="application/json")
    assert response.status_code == 400 and "nested" in response.json["error"]
    hook = webhook("TASKS_CREATED", tasks=[{"id": 1, "data": {"image": "/data/1.png", "deep": nested(depth)}}])
    response = c.post("/webhook", data=json.dumps(hook), content_type="application/json")
    assert response.status_code == 400 and "nested" in response.json["error"]


def test_real_label_studio_bodies_are_within_the_nesting_limit(client):
    c, _ = client
    assert c.post("/predict", json=body("predict_batch.json")).status_code == 200
    assert c.post("/webhook", json=body("webhook_annotation_created.json")).status_code == 200


def test_request_values_cannot_forge_log_lines_or_flood_the_log(client, caplog):
    c, _ = client
    caplog.set_level(logging.INFO)
    raw = body(KEYPOINT)
    raw["tasks"][0]["id"] = "7\n2026-01-01 00:00:00 INFO backend: FORGED admin logged in"
    raw["tasks"][0]["data"] = {}
    response = c.post("/predict", json=raw)
    assert response.status_code == 400
    raw = body(KEYPOINT)
    raw["params"]["context"]["result"][0]["value"]["x"] = "\ud800" + "y" * 1_000_000
    assert c.post("/predict", json=raw).status_code == 400
    logged = [r.getMessage() for r in caplog.records]
    assert logged and not any("\n" in line or "\r" in line for line in logged)
    assert "FORGED" in caplog.text  # the value is there, escaped, on its own line
    assert max(len(line) for line in logged) < 10_000  # a megabyte value is not a megabyte log line


@pytest.mark.parametrize("project", ["\u00b2", "111111111111111111", "1.2.3", -1, None, True, [1], {"id": 1}])
def test_odd_project_ids_never_break_setup_or_predict(client, project):
    c, services = client
    setup = protocol_body("setup.json") | {"project": project}
    answer = c.post("/setup", json=setup)
    assert answer.status_code == 200 and answer.json["model_version"] == services.loader.model_version
    batch = body("predict_batch.json") | {"project": project}
    assert c.post("/predict", json=batch).status_code == 200


def test_too_many_clicks_in_one_request_is_a_400_naming_the_limit(client):
    c, _ = client
    raw = body(KEYPOINT)
    region = raw["params"]["context"]["result"][0]
    raw["params"]["context"]["result"] = [region] * 10_000
    response = c.post("/predict", json=raw)
    assert response.status_code == 400 and "at most 200" in response.json["error"]


def test_a_huge_label_config_is_refused_not_cached(client):
    c, _ = client
    raw = body(KEYPOINT)
    raw["label_config"] = raw["label_config"].replace("<View>", "<View>" + "<Text name='t' value='x'/>" * 20_000)
    response = c.post("/predict", json=raw)
    assert response.status_code == 422 and "at most" in response.json["error"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/a\ud800.png", "http://h/a\r\nX: y", "x" * 20_000,
                                 "http://127.0.0.1:99999/a.png", "http://127.0.0.1:-1/a.png", "http://[127.0.0.1/a.png",
                                 "http://127.0.0.1]:80/a.png", "http://[::1:80/a.png", "http://h:1\\@127.0.0.1:2/a.png"])
def test_unusable_image_urls_are_a_400(client, url):
    c, _ = client
    raw = body(KEYPOINT)
    raw["tasks"][0]["data"]["image"] = url
    response = c.post("/predict", json=raw)
    assert response.status_code == 400 and "URL" in response.json["error"]


def test_a_webhook_whose_label_config_is_not_text_is_acknowledged(client):
    c, _ = client
    answer = c.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1, "label_config": 5},
                                      "tasks": [{"id": 1, "data": {"image": "/data/x.png"}}]})
    assert answer.status_code == 200  # the payload's config is not used: the look-up job reads the project's


def test_one_forged_webhook_or_batch_queues_at_most_the_cap(settings, make_client, caplog):
    caplog.set_level(logging.INFO)
    c, _ = make_client(settings.replace(max_tasks_per_request=50))
    store = redis.Redis.from_url(settings.redis_url)
    tasks = [{"id": i, "data": {"image": f"/data/upload/{i}.png"}} for i in range(1, 10_001)]
    answer = c.post("/webhook", json=webhook("TASKS_CREATED", tasks=tasks))
    assert answer.status_code == 200 and answer.json["tasks"] == 50 and answer.json["queued"] == 1
    assert [j.args for j in jobs.queue(store, jobs.WARM_QUEUE).jobs] == [[1, list(range(1, 51))]]
    assert "TASKS_CREATED with 10000 tasks: warming at most 50 (MAX_TASKS_PER_REQUEST)" in caplog.text
    batch = body("predict_batch.json") | {"tasks": tasks}
    response = c.post("/predict", json=batch)
    assert response.status_code == 200 and len(response.json["results"]) == 10_000  # one entry per task
    assert jobs.queue(store, jobs.PRELABEL_QUEUE).count == 50


def test_metrics_stay_bounded_and_answer_after_hostile_webhooks(client, caplog):
    c, _ = client
    caplog.set_level(logging.INFO)
    before = len(c.get("/metrics").data)
    rng = np.random.default_rng(0)
    for i in range(2000):
        action = "".join(chr(int(x)) for x in rng.integers(65, 91, 12))
        assert c.post("/webhook", json=webhook(action)).status_code == 200
    assert c.post("/webhook", json=webhook("X\ud800\nFORGED 127.0.0.1 admin logged in")).status_code == 200
    response = c.get("/metrics")
    assert response.status_code == 200
    # one "other" series and the webhook route's histogram; 2,001 series would be over 80 KB more
    assert len(response.data) < before + 20_000
    assert 'sam_webhooks_total{action="other"} 2001.0' in response.data.decode()
    assert "FORGED" not in caplog.text  # a newline in an action cannot forge a log line


def test_webhook_secret_and_metrics_auth(settings, make_client):
    c, _ = make_client(settings.replace(webhook_secret="s3cret", metrics_auth=True, basic_auth_user="ls",
                                        basic_auth_pass="pw"))
    assert c.post("/webhook", json=webhook("ANNOTATION_CREATED")).status_code == 401
    assert c.post("/webhook", json=webhook("ANNOTATION_CREATED"), headers={"X-Webhook-Secret": "nope"}).status_code == 401
    assert c.post("/webhook", json=webhook("ANNOTATION_CREATED"), headers={"X-Webhook-Secret": "s3cret"}).status_code == 200
    assert c.get("/metrics").status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert c.get("/metrics", headers=auth).status_code == 200


def test_a_16_bit_png_is_seen_as_a_browser_shows_it():
    grey = np.full((30, 40), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    decoded = decode_image(buf.getvalue(), 10**8).input_image
    assert abs(int(decoded.mean()) - 128) <= 1  # was 255: all white


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_seen_as_on_a_white_page(mode):
    # a cut-out object on a transparent background: browsers show the page (white) through it,
    # PIL's convert("RGB") showed the hidden colour (here black) instead
    pixels = np.zeros((30, 40, 4), dtype=np.uint8)
    pixels[10:20, 10:30] = (200, 30, 30, 255)  # the opaque object; the rest is transparent black
    image = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.quantize(colors=8)
        image.info["transparency"] = image.getpixel((0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"transparency": image.info["transparency"]} if mode == "P" else {}))
    reopened = Image.open(io.BytesIO(buf.getvalue()))
    assert reopened.mode == mode or "transparency" in reopened.info
    decoded = decode_image(buf.getvalue(), 10**8).input_image
    scale = decoded.shape[1] / 40
    assert decoded[1, 1].min() >= 250  # the transparent corner: white
    assert decoded[int(15 * scale), int(20 * scale)].max() < 250  # the object keeps its colour


def test_svg_gets_a_message_that_says_svg():
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(UnsupportedInput, match="SVG images are not supported"):
        decode_image(svg, 10**8)
    for variant in (b"\xef\xbb\xbf" + svg, b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n' + svg[21:],
                    b"<!-- drawn by hand -->\n" + svg[21:], b"\n\n  " + svg.upper()):
        with pytest.raises(UnsupportedInput, match="SVG images are not supported"):
            decode_image(variant, 10**8)
    with pytest.raises(UnsupportedInput, match="not a PNG, JPEG") as garbage:
        decode_image(b"\x00garbage" * 10, 10**8)
    assert "BytesIO" not in garbage.value.message
