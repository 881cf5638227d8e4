"""The zoom path through the real app: a real Redis, the small random SAM, images of 2400 x 1600.

Random weights answer noise, so these tests steer the path with boxes (a small box decides its
window without the whole-image answer) and check what the path promises: the window chosen, its
embedding cached under the image's key plus the window, reused by neighbouring clicks and by other
processes, masks at full resolution inside their windows, the path named in meta and /metrics.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import redis

from backend.jobs.tasks import warm_image
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.rle import rle_to_mask
from backend.pipeline.embeddings import EmbeddingCache, content_digest
from backend.pipeline.timings import Timings
from backend.settings import Settings, SettingsError
from model.automatic import AutomaticConfig
from model.windows import grid_windows, window_for_box
from tests.conftest import make_image, protocol_body
from tests.test_api import metric, validate

SIZE = (1600, 2400)  # (height, width): over ZOOM_MIN_SIDE
URL = "/data/upload/large.jpg"


@pytest.fixture
def large(image_server):
    data = make_image(SIZE[1], SIZE[0], seed=3, fmt="JPEG")
    image_server.add(URL, data)
    return data


def box_body(box_px, output_config: bool = True) -> dict:
    body = copy.deepcopy(protocol_body("predict_interactive_rectanglelabels.json"))
    body["tasks"][0]["data"]["image"] = URL
    height, width = SIZE
    region = body["params"]["context"]["result"][0]
    region.update(original_width=width, original_height=height)
    x0, y0, x1, y1 = box_px
    region["value"].update(x=x0 / width * 100, y=y0 / height * 100, width=(x1 - x0) / width * 100,
                           height=(y1 - y0) / height * 100)
    return body


def window_key_count(settings: Settings) -> int:
    return len(redis.Redis.from_url(settings.redis_url).keys("sam-backend:emb:*:win:*"))


def test_a_small_box_on_a_large_image_is_answered_on_a_zoom_window_at_full_resolution(client, large, settings,
                                                                                        image_server):
    c, services = client
    box = (1000, 800, 1040, 830)
    response = c.post("/predict", json=box_body(box))
    assert response.status_code == 200, response.json
    result = response.json["results"][0]
    validate(box_body(box), result)
    window = window_for_box(box, SIZE, 1024, max_zoom=4, largest=1024)
    assert window.side == 256  # 4x zoom: one answer cell per pixel
    brush = next(r for r in result["result"] if r["type"] == "brushlabels")
    assert (brush["original_width"], brush["original_height"]) == (2400, 1600)
    assert brush["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    mask = rle_to_mask(brush["value"]["rle"], 1600, 2400)
    outside = mask.copy()
    outside[window.y0:window.y1, window.x0:window.x1] = False
    assert not outside.any()  # everything it says is inside the window it decoded
    for poly in (r for r in result["result"] if r["type"] == "polygonlabels"):
        assert poly["meta"]["sam_path"] == "zoom"
        pts = np.array(poly["value"]["points"]) / 100 * np.array([2400, 1600])
        assert (pts[:, 0] >= window.x0).all() and (pts[:, 0] <= window.x1).all()
        assert (pts[:, 1] >= window.y0).all() and (pts[:, 1] <= window.y1).all()
    key = EmbeddingCache.window_key(services.loader.model_id, content_digest(large), window.key)
    assert redis.Redis.from_url(settings.redis_url).exists(key)
    assert EmbeddingCache.key(services.loader.model_id, content_digest(large)) == key.split(":win:")[0]
    assert metric(c, 'sam_zoom_answers_total{path="zoom"}') == 1
    assert metric(c, "sam_window_encodes_total") == 1


def test_neighbouring_clicks_and_other_processes_reuse_the_window_without_the_image(settings, make_client, large,
                                                                                    image_server):
    c, _ = make_client(settings)
    assert c.post("/predict", json=box_body((1000, 800, 1040, 830))).status_code == 200
    assert metric(c, "sam_window_encodes_total") == 1
    downloads = len(image_server.requests)
    # the annotator's next box, a little to the side: the same grid window, from the cache
    again = c.post("/predict", json=box_body((1010, 790, 1050, 822)))
    assert again.status_code == 200 and again.json["results"][0]["result"][0]["meta"]["sam_path"] == "zoom"
    assert metric(c, "sam_window_encodes_total") == 1
    assert len(image_server.requests) == downloads  # warm: neither the image nor an encode
    # another worker process (its own services, the same Redis) finds the window there
    other, _ = make_client(settings)
    assert other.post("/predict", json=box_body((1005, 805, 1035, 828))).status_code == 200
    assert metric(other, "sam_window_encodes_total") == 0
    assert window_key_count(settings) == 1


def test_a_box_too_large_for_a_window_keeps_the_whole_image_path_and_says_so(client, large):
    c, _ = client
    response = c.post("/predict", json=box_body((200, 200, 2000, 1400)))
    assert response.status_code == 200
    regions = response.json["results"][0]["result"]
    assert all(r["meta"] == {"sam_path": "whole"} for r in regions)
    assert metric(c, 'sam_zoom_answers_total{path="whole"}') == 1 and metric(c, "sam_window_encodes_total") == 0


def test_zoom_off_and_small_images_keep_todays_answer(settings, make_client, large, image_server):
    c, _ = make_client(settings.replace(zoom_threshold=0.0))
    response = c.post("/predict", json=box_body((1000, 800, 1040, 830)))
    assert response.status_code == 200
    assert all("meta" not in r for r in response.json["results"][0]["result"])
    assert window_key_count(settings) == 0


def test_warm_windows_embeds_the_native_grid_so_the_first_zoomed_click_is_warm(settings, make_client, large):
    _, services = make_client(settings.replace(warm_windows=True))
    done = warm_image(services, URL)
    grid = grid_windows(1024, SIZE, 1024)
    assert done["windows_embedded"] == len(grid) == 12
    assert window_key_count(settings) == 12
    # a box that needs a native window lands on a grid window: nothing left to embed (ZOOM_MAX=1: the
    # random test SAM's thin noise would otherwise be looked at again through finer windows)
    c, _ = make_client(settings.replace(zoom_max=1))
    response = c.post("/predict", json=box_body((600, 300, 900, 600)))
    assert response.status_code == 200
    assert response.json["results"][0]["result"][0]["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    # one too large for any window: the whole-image answer, its edges from the cached windows
    response = c.post("/predict", json=box_body((600, 300, 1000, 700)))
    assert response.json["results"][0]["result"][0]["meta"]["sam_path"] == "edges"
    assert metric(c, "sam_window_encodes_total") == 0
    # without WARM_WINDOWS, warming embeds the whole image only
    flushed = redis.Redis.from_url(settings.redis_url)
    flushed.flushall()
    _, plain = make_client(settings)
    assert warm_image(plain, URL)["windows_embedded"] == 0 and window_key_count(settings) == 0


def test_a_tiled_draft_merges_tiles_and_applies_the_minimum_area_to_whole_objects(settings, make_client, large):
    body = copy.deepcopy(protocol_body("predict_batch.json"))
    config = parse_label_config(body["label_config"])
    task = body["tasks"][0]
    task["data"]["image"] = URL
    _, services = make_client(settings)
    embedding = services.embedder.for_url(URL)
    lenient = AutomaticConfig(points_per_side=2, pred_iou_thresh=-10, stability_thresh=0, min_area_fraction=0.0)
    timings = Timings()
    draft = services.predictor.draft(task, embedding, config, timings, automatic=lenient)
    assert "merge_tiles" in timings.stages and window_key_count(settings) == 12  # every tile embedded once
    brushes = [r for r in draft["result"] if r["type"] == "brushlabels"]
    assert brushes and all(r["meta"]["sam_path"] == "tiles" for r in brushes)
    masks = [rle_to_mask(r["value"]["rle"], 1600, 2400) for r in brushes]
    assert all(m.any() for m in masks)
    validate(body | {"label_config": body["label_config"]}, draft)
    # the minimum area is applied to merged objects: the largest one survives a threshold just below it
    largest = max(int(m.sum()) for m in masks)
    strict = dataclass_replace(lenient, min_area_fraction=(largest - 1) / (1600 * 2400))
    kept = services.predictor.draft(task, embedding, config, Timings(), automatic=strict)
    kept_brushes = [r for r in kept["result"] if r["type"] == "brushlabels"]
    assert len(kept_brushes) >= 1
    assert all(rle_to_mask(r["value"]["rle"], 1600, 2400).sum() >= largest - 1 for r in kept_brushes)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize("name,value,words", [
    ("ZOOM_MAX", "3", "ZOOM_MAX=3 must be one of 1, 2, 4, 8"),
    ("ZOOM_EDGES", "sometimes", "ZOOM_EDGES='sometimes' must be one of cached, always, off"),
    ("ZOOM_THRESHOLD", "2", "fraction of the image's long side"),
    ("ZOOM_MAX_WINDOWS", "0", "must be >= 1"),
])
def test_zoom_settings_are_checked(name, value, words):
    with pytest.raises(SettingsError, match=words.replace("(", r"\(")):
        Settings.from_env({name: value})
