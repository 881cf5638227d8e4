"""A 20 MP photo through a real Label Studio 1.23.2: a click on a small defect comes back through a
zoom window as a full-resolution region, and Label Studio keeps the region's meta that says so."""

from __future__ import annotations

import numpy as np

from backend.bench.click import synthetic_jpeg
from backend.labelstudio.rle import rle_to_mask
from model.windows import window_for_box
from tests.e2e.conftest import ROOT
from tests.e2e.test_label_studio import connect, create_project

WIDTH, HEIGHT = 5472, 3648
CONFIG = ROOT / "label_config" / "surface_defects_brush.xml"


def test_a_click_on_a_20_mp_photo_comes_back_at_full_resolution_and_keeps_its_meta(label_studio, backend):
    project = create_project(label_studio, CONFIG)
    upload = label_studio.api("POST", f"/api/projects/{project['id']}/import",
                              files={"file": ("screen.jpg", synthetic_jpeg((WIDTH, HEIGHT), seed=7), "image/jpeg")})
    assert upload.status_code == 201, upload.text
    task = label_studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"][0]
    ml_id = connect(label_studio, backend, project["id"])
    box = (3000, 2000, 3012, 2012)  # a pit of 12 px: a fraction of one answer cell on the whole image
    context = {"result": [{
        "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "id": "pit1",
        "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
        "value": {"x": box[0] / WIDTH * 100, "y": box[1] / HEIGHT * 100, "width": 12 / WIDTH * 100,
                  "height": 12 / HEIGHT * 100, "rotation": 0, "rectanglelabels": ["Pit"]},
    }]}
    encodes = backend.metric("sam_window_encodes_total")
    response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                json={"task": task["id"], "context": context})
    assert response.status_code == 200, response.text
    regions = response.json()["data"]["result"]
    assert len(regions) == 1
    region = regions[0]
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    assert region["value"]["brushlabels"] == ["Pit"]
    assert region["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    mask = rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH)
    assert mask.shape == (HEIGHT, WIDTH)
    window = window_for_box(box, (HEIGHT, WIDTH), 1024, max_zoom=4)
    outside = mask.copy()
    outside[window.y0:window.y1, window.x0:window.x1] = False
    assert window.side == 256 and not outside.any()
    assert backend.metric("sam_window_encodes_total") == encodes + 1
    assert backend.metric('sam_zoom_answers_total{path="zoom"}') >= 1

    # the next box on the same pit is warm: same window, no encode
    context["result"][0]["value"]["x"] += 2 / WIDTH * 100
    again = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                             json={"task": task["id"], "context": context})
    assert again.status_code == 200 and again.json()["data"]["result"][0]["meta"]["sam_path"] == "zoom"
    assert backend.metric("sam_window_encodes_total") == encodes + 1

    # Label Studio stores the region with its meta, as a prediction and as a submitted annotation
    stored = label_studio.api("POST", "/api/predictions", json={"task": task["id"], "result": regions,
                                                                "score": 0.5, "model_version": "e2e-zoom"})
    assert stored.status_code == 201, stored.text
    back = label_studio.api("GET", f"/api/predictions/{stored.json()['id']}").json()
    assert back["result"][0]["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    annotation = label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": regions})
    assert annotation.status_code == 201, annotation.text
    kept = label_studio.api("GET", f"/api/annotations/{annotation.json()['id']}").json()["result"][0]
    assert kept["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    assert np.array_equal(rle_to_mask(kept["value"]["rle"], HEIGHT, WIDTH), mask)
