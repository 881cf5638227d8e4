"""A non-SAM-1 family through a real Label Studio 1.23.2: the backend serves an EfficientViT-SAM l0
checkpoint (random weights of the real l0 architecture, written by tests/conftest.py's
`evit_checkpoint` with the family's own modules), a smart keypoint click sent through Label Studio's
own interactive-annotating API comes back as regions of the image's size and the click's label, Label
Studio records the family's model version, and a second click is answered from the cache. Then batched
pre-labelling (ENCODE_BATCH_SIZE=3) through the same Label Studio: a bad image fails alone."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.conftest import ROOT, TIMINGS, BackendServer
from tests.e2e.test_label_studio import add_images, check_regions, connect, create_project, prompt_contexts

CONFIG = ROOT / "label_config" / "brush_and_polygon.xml"


@pytest.fixture(scope="module")
def evit_backend(label_studio, evit_checkpoint, e2e_redis, tmp_path_factory):
    # one backend start for the whole module: a start costs a model load and an ONNX export under load
    # ENCODE_BATCH_SIZE=3: `prelabel` queues jobs of three tasks, encoded in one forward pass by the
    # worker `serve` starts (clicks are unaffected: they encode one image)
    server = BackendServer(tmp_path_factory.mktemp("evit-backend"), evit_checkpoint, e2e_redis.url,
                           label_studio.url, label_studio.token, env={"ENCODE_BATCH_SIZE": "3"})
    TIMINGS["EfficientViT-SAM backend start"] = time.monotonic() - server.started
    yield server
    server.stop()


def _click(label_studio, ml_id: int, task_id: int, context: dict) -> dict:
    response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                json={"task": task_id, "context": context})
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body.get("errors"), body  # Label Studio answers 200 with the backend's error inside
    return body["data"]


def test_efficientvit_sam_answers_clicks_through_label_studio_and_reuses_its_embedding(label_studio, evit_backend):
    health = requests.get(evit_backend.url + "/health", timeout=10).json()
    assert health["model_version"].startswith("efficientvit_sam-l0-"), health  # really that family, that size

    project = create_project(label_studio, CONFIG)
    task = add_images(label_studio, project["id"])[0]
    ml_id = connect(label_studio, evit_backend, project["id"])
    # Label Studio took the version from /setup: its drafts and stored predictions name the family
    assert label_studio.api("GET", f"/api/ml/{ml_id}").json()["model_version"] == health["model_version"]

    config_xml = CONFIG.read_text()
    label, context = next((lab, ctx) for lab, ctx in prompt_contexts(config_xml)
                          if ctx["result"][0]["type"] == "keypointlabels")
    positive = {"result": [r for r in context["result"] if r["is_positive"]]}  # one smart keypoint click

    first = _click(label_studio, ml_id, task["id"], positive)
    check_regions(config_xml, first["result"], label)  # the image's size, the click's label, valid regions
    assert {r["type"] for r in first["result"]} == {"brushlabels", "polygonlabels"}
    if "model_version" in first:  # what Label Studio passes on of the backend's answer
        assert first["model_version"] == health["model_version"]

    encodes = evit_backend.metric("sam_encoder_seconds_count")
    hits = evit_backend.metric('sam_embedding_cache_total{result="hit')
    second = _click(label_studio, ml_id, task["id"], context)  # the same click plus an Alt-click
    check_regions(config_xml, second["result"], label)
    assert evit_backend.metric("sam_encoder_seconds_count") == encodes, "the second click encoded the image again"
    assert evit_backend.metric('sam_embedding_cache_total{result="hit') > hits, "the second click missed the cache"


def test_batched_prelabel_drafts_every_good_task_and_names_the_bad_one(label_studio, evit_backend):
    health = requests.get(evit_backend.url + "/health", timeout=10).json()
    project = create_project(label_studio, CONFIG)
    good = add_images(label_studio, project["id"])  # an upload and a local file
    # a task whose image Label Studio cannot serve (no such file in the storage): 404 for the backend
    missing = label_studio.api("POST", f"/api/projects/{project['id']}/import",
                               json=[{"image": f"/data/local-files/?d=p{project['id']}/missing.png"}])
    assert missing.status_code == 201, missing.text
    tasks = label_studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"]
    bad = next(t for t in tasks if "missing.png" in t["data"]["image"])
    assert len(tasks) == 3
    connect(label_studio, evit_backend, project["id"])

    run = evit_backend.cli("prelabel", "--project", str(project["id"]), "--wait")
    assert run.returncode == 1, run.stdout + run.stderr  # one task failed, and the command says so
    assert "3 queued for pre-labelling" in run.stdout, run.stdout
    failed = [line for line in run.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "1 of 3 failed" in failed[0] and f"task {bad['id']}:" in failed[0], run.stdout
    assert "404" in failed[0], failed[0]  # the reason: Label Studio has no such file
    for task in good:  # drafted and posted in the same job as the bad one
        predictions = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
        assert [p["model_version"] for p in predictions] == [health["model_version"]], predictions
    assert label_studio.api("GET", "/api/predictions", params={"task": bad["id"]}).json() == []
