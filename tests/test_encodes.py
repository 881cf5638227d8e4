"""Encodes are shared and bounded: an encode in flight in another process is waited for, never run
twice (issue 13, item 4); a process runs at most MAX_CONCURRENT_ENCODES at once and a click that
cannot start in time gets 503 with Retry-After (issue 11). Real Redis, real app, real tiny SAM."""

from __future__ import annotations

import threading
import time

from backend.pipeline.embeddings import Embedding, content_digest
from backend.pipeline.images import decode_image
from tests.conftest import make_image, protocol_body

IMAGE = "/data/local-files/?d=local/img_local.png"


def encoder_runs(services) -> float:
    """How many times this process ran the image encoder (its Prometheus histogram's count)."""
    return sum(s.value for m in services.metrics.encoder.collect() for s in m.samples if s.name.endswith("_count"))


def test_an_encode_in_flight_elsewhere_is_waited_for_not_repeated(settings, make_client, image_server):
    data = make_image(80, 60)
    image_server.add(IMAGE, data)
    c, clicking = make_client(settings)
    _, elsewhere = make_client(settings)  # another process sharing the Redis (a worker, say)
    key = elsewhere.cache.key(elsewhere.loader.model_id, content_digest(data))
    claim = elsewhere.cache.claim(key)  # "elsewhere" starts encoding this image
    assert claim is not None and clicking.cache.claim(key) is None
    answers = []
    click = threading.Thread(target=lambda: answers.append(
        c.post("/predict", json=protocol_body("predict_interactive_keypointlabels.json"))))
    click.start()
    time.sleep(1.0)
    assert answers == []  # the click waits for the encode in flight instead of running its own
    image = decode_image(data, settings.max_image_pixels)
    features = elsewhere.loader.get().encode(image.input_image)
    elsewhere.cache.put(key, Embedding.quantized(features, image.original_size, image.input_size))
    claim.release()
    click.join(timeout=60)
    assert answers and answers[0].status_code == 200 and answers[0].json["results"][0]["result"]
    assert encoder_runs(clicking) == 0  # one encode in all: the other process's


def test_an_encode_whose_encoder_died_is_taken_over(settings, make_client, image_server):
    data = make_image(80, 60, seed=3)
    image_server.add(IMAGE, data)
    c, clicking = make_client(settings)
    key = clicking.cache.key(clicking.loader.model_id, content_digest(data))
    # a claim nobody refreshes: its holder died mid-encode
    clicking.cache.client.set(f"{key}:encoding", "dead-process", px=1500)
    answer = c.post("/predict", json=protocol_body("predict_interactive_keypointlabels.json"))
    assert answer.status_code == 200 and encoder_runs(clicking) == 1


def test_saturated_encoders_answer_503_with_retry_after(settings, make_client, image_server):
    image_server.add(IMAGE, make_image(80, 60, seed=5))
    c, services = make_client(settings.replace(max_concurrent_encodes=1, encode_wait=0.5))
    assert services.embedder._encode_slots.acquire(timeout=1)  # another click is encoding in this process
    try:
        answer = c.post("/predict", json=protocol_body("predict_interactive_keypointlabels.json"))
    finally:
        services.embedder._encode_slots.release()
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "MAX_CONCURRENT_ENCODES" in answer.json["error"]
    assert not services.cache.client.keys("*:encoding")  # the claim was given back
    # a slot free again: the same click works
    assert c.post("/predict", json=protocol_body("predict_interactive_keypointlabels.json")).status_code == 200
    assert encoder_runs(services) == 1
