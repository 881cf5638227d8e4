"""End to end through a real Label Studio 1.23.2: projects from label_config/, uploaded and local-files
images, `sam-backend connect`, interactive clicks, retrieve predictions, webhooks, personal access tokens."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.bitmask import data_url_to_mask
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.regions import region_mask
from backend.labelstudio.rle import rle_to_mask

from tests.conftest import free_port, make_image
from tests.e2e.conftest import ROOT, TIMINGS, BackendServer

CONFIGS = sorted((ROOT / "label_config").glob("*.xml"))
WIDTH, HEIGHT = 96, 72


def create_project(ls, config_path: Path) -> dict:
    response = ls.api("POST", "/api/projects", json={"title": f"e2e {config_path.stem}",
                                                     "label_config": config_path.read_text()})
    assert response.status_code == 201, response.text
    return response.json()


def add_images(ls, project_id: int) -> list[dict]:
    """One uploaded file and one image from a local-files storage; returns the project's tasks."""
    upload = ls.api("POST", f"/api/projects/{project_id}/import",
                    files={"file": ("upload.png", make_image(WIDTH, HEIGHT, seed=project_id), "image/png")})
    assert upload.status_code == 201, upload.text
    folder = ls.files_root / f"p{project_id}"
    folder.mkdir()
    (folder / "local.png").write_bytes(make_image(WIDTH, HEIGHT, seed=100 + project_id))
    local_storage(ls, project_id, folder, sync=True)
    tasks = ls.api("GET", "/api/tasks", params={"project": project_id}).json()["tasks"]
    assert sorted(t["data"]["image"].split("/")[2] for t in tasks) == ["local-files", "upload"]
    return tasks


def local_storage(ls, project_id: int, folder: Path, sync: bool) -> None:
    """A local-files storage on `folder`; Label Studio serves /data/local-files/ only below one.
    With `sync`, each file becomes a task."""
    storage = ls.api("POST", "/api/storages/localfiles", json={"project": project_id, "path": str(folder),
                                                               "use_blob_urls": True, "title": folder.name})
    assert storage.status_code == 201, storage.text
    if sync:
        synced = ls.api("POST", f"/api/storages/localfiles/{storage.json()['id']}/sync")
        assert synced.status_code == 200, synced.text


def connect(ls, backend: BackendServer, project_id: int) -> int:
    """`sam-backend connect`, twice: the second run must not add a second backend."""
    for _ in range(2):
        result = backend.cli("connect", "--project", str(project_id), "--url", backend.url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Auto-Annotation" in result.stdout
    ml = ls.api("GET", "/api/ml", params={"project": project_id}).json()
    assert len(ml) == 1 and ml[0]["is_interactive"] and ml[0]["auth_method"] == "BASIC_AUTH"
    assert ml[0]["readable_state"] == "Connected"
    return ml[0]["id"]


def prompt_contexts(config_xml: str) -> list[tuple[str, dict]]:
    """A positive + negative keypoint context and a box context, with the first label of each smart tag."""
    config = parse_label_config(config_xml)
    interface = LabelInterface(config_xml)
    contexts = []
    for name in config.prompt_tags:
        control = interface.get_control(name)
        label = control.labels[0]
        base = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "from_name": name,
                "to_name": config.image_name, "origin": "manual"}
        if control.tag == "KeyPointLabels":
            regions = [
                dict(base, id="kpos", type="keypointlabels", is_positive=True,
                     value={"x": 40.0, "y": 45.0, "width": 0.6, "keypointlabels": [label]}),
                dict(base, id="kneg", type="keypointlabels", is_positive=False,
                     value={"x": 80.0, "y": 80.0, "width": 0.6, "keypointlabels": [label]}),
            ]
        else:
            regions = [dict(base, id="box1", type="rectanglelabels",
                            value={"x": 20.0, "y": 25.0, "width": 40.0, "height": 40.0, "rotation": 0,
                                   "rectanglelabels": [label]})]
        contexts.append((label, {"result": regions}))
    return contexts


def check_regions(config_xml: str, regions: list[dict], label: str) -> None:
    assert regions, "no region came back"
    interface = LabelInterface(config_xml)
    errors = interface.validate_prediction({"result": regions, "score": 0.5}, return_errors=True)
    assert errors in (True, [], None), errors
    for region in regions:
        assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
        if region["type"] == "brushlabels":
            assert region["value"]["brushlabels"] == [label]
            mask = rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH)
            assert mask.shape == (HEIGHT, WIDTH)
        elif region["type"] == "bitmasklabels":
            assert region["value"]["bitmasklabels"] == [label]
            assert data_url_to_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH).shape == (HEIGHT, WIDTH)
        else:
            assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == [label]
            points = np.array(region["value"]["points"])
            assert points.shape[0] >= 3 and points.min() >= 0 and points.max() <= 100


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_clicks_in_label_studio_come_back_as_masks(label_studio, backend, config_path):
    project = create_project(label_studio, config_path)
    tasks = add_images(label_studio, project["id"])
    ml_id = connect(label_studio, backend, project["id"])
    config_xml = config_path.read_text()
    for task in tasks:
        for label, context in prompt_contexts(config_xml):
            response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                        json={"task": task["id"], "context": context})
            assert response.status_code == 200, response.text
            body = response.json()
            assert "errors" not in body or not body["errors"], body
            check_regions(config_xml, body["data"]["result"], label)
            # from the first process start (Label Studio's) to the first mask shown to an annotator
            TIMINGS.setdefault("start to first mask", time.monotonic() - label_studio.started)


def test_retrieve_predictions_stores_one_draft_per_task(label_studio, backend):
    """Tasks imported with a detector's boxes get one SAM mask per box, stored by Label Studio."""
    config_path = ROOT / "label_config" / "surface_defects_brush.xml"
    project = create_project(label_studio, config_path)
    folder = label_studio.files_root / f"p{project['id']}"
    folder.mkdir()
    tasks = []
    for i in range(3):
        (folder / f"screen{i}.png").write_bytes(make_image(WIDTH, HEIGHT, seed=200 + i))
        box = {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
               "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0,
               "value": {"x": 10.0 + 10 * i, "y": 20.0, "width": 30.0, "height": 30.0, "rotation": 0,
                         "rectanglelabels": ["Scratch" if i % 2 else "Pit"]}}
        tasks.append({"data": {"image": f"/data/local-files/?d=p{project['id']}/screen{i}.png"},
                      "predictions": [{"model_version": "detector-v1", "result": [box]}]})
    local_storage(label_studio, project["id"], folder, sync=False)  # tasks come from the JSON import below
    imported = label_studio.api("POST", f"/api/projects/{project['id']}/import", json=tasks)
    assert imported.status_code == 201, imported.text
    connect(label_studio, backend, project["id"])
    ml = label_studio.api("GET", "/api/ml", params={"project": project["id"]}).json()[0]
    model_version = ml["model_version"]
    assert model_version.startswith("sam-")
    # the importer's version is the project's: connect says the editor would show the detector's boxes
    told = backend.cli("connect", "--project", str(project["id"]), "--url", backend.url)
    assert told.returncode == 0 and "'detector-v1'" in told.stdout and "--show-our-drafts" in told.stdout

    def ours() -> dict[int, list]:
        found: dict[int, list] = {}
        for task in label_studio.api("GET", "/api/tasks", params={"project": project["id"], "fields": "all"}).json()["tasks"]:
            preds = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
            found[task["id"]] = [p for p in preds if p["model_version"] == model_version]
        return found

    # a retrieve queues a pre-label job per task; the backend's worker posts the drafts to Label Studio
    deadline = time.monotonic() + 120
    while True:
        action = label_studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                                      "project": project["id"]},
                                  json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        drafts = ours()
        if all(drafts.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(drafts) == 3
    interface = LabelInterface(config_path.read_text())
    for task_id, predictions in drafts.items():
        assert len(predictions) == 1, (task_id, predictions)  # exactly one, never an empty one before it
        result = predictions[0]["result"]
        assert len(result) == 1 and result[0]["type"] == "brushlabels"
        assert interface.validate_prediction({"result": result, "score": predictions[0]["score"]},
                                             return_errors=True) in (True, [], None)
    labels = sorted(p[0]["result"][0]["value"]["brushlabels"][0] for p in drafts.values())
    assert labels == ["Pit", "Pit", "Scratch"]  # each mask has its box's label

    # what the editor pre-fills (the label stream's next task): the detector's boxes, until connect
    # --show-our-drafts makes our backend the project's model version; then our SAM draft
    def shown_versions() -> set[str]:
        task = label_studio.api("GET", f"/api/projects/{project['id']}/next").json()
        return {p["model_version"] for p in task["predictions"]}

    assert shown_versions() == {"detector-v1"}
    shown = backend.cli("connect", "--project", str(project["id"]), "--url", backend.url, "--show-our-drafts")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert label_studio.api("GET", f"/api/projects/{project['id']}").json()["model_version"] == ml["title"]
    assert shown_versions() == {model_version}
    again = backend.cli("connect", "--project", str(project["id"]), "--url", backend.url)
    assert "detector-v1" not in again.stdout  # nothing hidden any more: no note


def test_bitmask_clicks_drafts_and_annotations_round_trip_through_label_studio(label_studio, backend):
    """BitmaskLabels in Label Studio 1.23.2: a click through its interactive API answers a PNG of the
    image's size; the pre-label job's draft for an imported box is stored and reads back pixel-identical
    to the click on that box; an annotation made of that region reads back pixel-identical too."""
    config_path = ROOT / "label_config" / "surface_defects_bitmask.xml"
    project = create_project(label_studio, config_path)
    pid = project["id"]
    folder = label_studio.files_root / f"p{pid}"
    folder.mkdir()
    (folder / "screen.png").write_bytes(make_image(WIDTH, HEIGHT, seed=700))
    box = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": WIDTH,
           "original_height": HEIGHT, "image_rotation": 0,
           "value": {"x": 20.0, "y": 25.0, "width": 40.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["Pit"]}}
    local_storage(label_studio, pid, folder, sync=False)
    imported = label_studio.api("POST", f"/api/projects/{pid}/import", json=[
        {"data": {"image": f"/data/local-files/?d=p{pid}/screen.png"},
         "predictions": [{"model_version": "detector-v1", "result": [box]}]}])
    assert imported.status_code == 201, imported.text
    [task] = label_studio.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"]
    ml_id = connect(label_studio, backend, pid)
    config_xml = config_path.read_text()

    def click(region: dict) -> dict:
        response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                    json={"task": task["id"], "context": {"result": [region]}})
        assert response.status_code == 200, response.text
        assert not response.json().get("errors"), response.json()
        [answer] = response.json()["data"]["result"]
        check_regions(config_xml, [answer], region["value"][region["type"]][0])
        assert answer["type"] == "bitmasklabels" and answer["from_name"] == "defect"
        assert answer["value"]["imageDataURL"].startswith("data:image/png;base64,")
        return answer

    [(_, keypoints)] = [c for c in prompt_contexts(config_xml) if c[1]["result"][0]["type"] == "keypointlabels"]
    click(keypoints["result"][0])
    boxed = click(dict(box, id="b1", origin="manual"))
    expected = data_url_to_mask(boxed["value"]["imageDataURL"], HEIGHT, WIDTH)

    model_version = label_studio.api("GET", "/api/ml", params={"project": pid}).json()[0]["model_version"]
    deadline = time.monotonic() + 120
    while True:  # a retrieve queues a pre-label job; the backend's worker posts the draft
        action = label_studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                                  json={"selectedItems": {"all": True, "excluded": []}})
        assert action.status_code == 200, action.text
        ours = [p for p in label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
                if p["model_version"] == model_version]
        if ours or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(ours) == 1, ours
    [drafted] = ours[0]["result"]
    assert drafted["type"] == "bitmasklabels" and drafted["value"]["bitmasklabels"] == ["Pit"]
    assert LabelInterface(config_xml).validate_prediction({"result": ours[0]["result"], "score": ours[0]["score"]},
                                                          return_errors=True) in (True, [], None)
    # stored as sent: the PNG the worker made for the imported box is the one the click on that box made
    assert drafted["value"]["imageDataURL"] == boxed["value"]["imageDataURL"]
    assert np.array_equal(data_url_to_mask(drafted["value"]["imageDataURL"], HEIGHT, WIDTH), expected)

    # an annotator accepting the draft as is: an annotation of that region, read back pixel-identical
    created = label_studio.api("POST", f"/api/tasks/{task['id']}/annotations",
                               json={"result": [drafted], "parent_prediction": ours[0]["id"]})
    assert created.status_code == 201, created.text
    stored = label_studio.api("GET", f"/api/annotations/{created.json()['id']}").json()
    [region] = stored["result"]
    assert region["type"] == "bitmasklabels" and region["value"]["imageDataURL"] == drafted["value"]["imageDataURL"]
    label, mask = region_mask(region)  # as training and the COCO export read it
    assert label == "Pit" and np.array_equal(mask, expected)


def predictions_by_task(label_studio, project_id: int, model_version: str) -> dict[int, list]:
    found = {}
    for task in label_studio.api("GET", "/api/tasks", params={"project": project_id, "page_size": 1000}).json()["tasks"]:
        preds = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
        found[task["id"]] = [p for p in preds if p["model_version"] == model_version]
    return found


def test_prelabel_a_project_with_two_workers_one_killed_mid_run(label_studio, backend, tmp_path):
    """Every task gets exactly one draft; a SIGKILLed worker loses only its job, which is retried."""
    config_path = ROOT / "label_config" / "multi_object_polygon.xml"
    project = create_project(label_studio, config_path)
    folder = label_studio.files_root / f"p{project['id']}"
    folder.mkdir()
    for i in range(20):
        (folder / f"bin{i:02d}.png").write_bytes(make_image(WIDTH, HEIGHT, seed=300 + i))
    local_storage(label_studio, project["id"], folder, sync=True)
    boxed = []
    for i in range(4):  # tasks that come with a detector's box: one mask per box, with its label
        name = f"boxed{i}.png"
        (folder / name).write_bytes(make_image(WIDTH, HEIGHT, seed=400 + i))
        box = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": WIDTH,
               "original_height": HEIGHT, "image_rotation": 0,
               "value": {"x": 20.0, "y": 20.0, "width": 40.0, "height": 40.0, "rotation": 0,
                         "rectanglelabels": ["Metal"]}}
        boxed.append({"data": {"image": f"/data/local-files/?d=p{project['id']}/{name}"},
                      "predictions": [{"model_version": "detector-v1", "result": [box]}]})
    assert label_studio.api("POST", f"/api/projects/{project['id']}/import", json=boxed).status_code == 201
    model_version = backend.model_version()

    workers = [backend.worker("--queues", "sam-prelabel") for _ in range(2)]
    try:
        started = backend.cli("prelabel", "--project", str(project["id"]))
        assert started.returncode == 0, started.stdout + started.stderr
        assert "24 tasks, 24 queued" in started.stdout
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = sum(bool(p) for p in predictions_by_task(label_studio, project["id"], model_version).values())
            if done >= 3:
                break
            time.sleep(0.3)
        os.killpg(workers[0].pid, signal.SIGKILL)  # mid-run: it may hold a job
        workers[0].wait(timeout=30)
        finished = backend.cli("prelabel", "--project", str(project["id"]), "--wait")
        assert finished.returncode == 0, finished.stdout + finished.stderr
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=60)

    drafts = predictions_by_task(label_studio, project["id"], model_version)
    assert len(drafts) == 24
    assert all(len(p) == 1 for p in drafts.values()), {t: len(p) for t, p in drafts.items() if len(p) != 1}
    interface = LabelInterface(config_path.read_text())
    for predictions in drafts.values():
        result = predictions[0]["result"]
        assert interface.validate_prediction({"result": result, "score": predictions[0]["score"]},
                                             return_errors=True) in (True, [], None)
    labels = {}
    for task_id, predictions in drafts.items():
        image = label_studio.api("GET", f"/api/tasks/{task_id}").json()["data"]["image"]
        labels[image] = {tuple(r["value"]["polygonlabels"]) for r in predictions[0]["result"]}
    boxed_labels = [found for image, found in labels.items() if "boxed" in image]
    assert len(boxed_labels) == 4 and any(boxed_labels)
    assert all(found <= {("Metal",)} for found in boxed_labels)  # the box's label
    assert all(found <= {("Plastic",)} for image, found in labels.items() if "boxed" not in image)  # default label

    # a rerun drafts nothing twice: the same predictions (ids, versions, results); Label Studio's
    # human-readable fields such as created_ago ("0 minutes", "1 minute") change with time alone
    def identity(by_task: dict) -> dict:
        return {task: [(p["id"], p["model_version"], p["result"]) for p in predictions]
                for task, predictions in by_task.items()}

    again = backend.cli("prelabel", "--project", str(project["id"]), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert identity(predictions_by_task(label_studio, project["id"], model_version)) == identity(drafts)

    # the drafts as COCO for CVAT: one object per polygon region, on the right image, with its label
    out = tmp_path / "coco.json"
    exported = backend.cli("export", "--project", str(project["id"]), "--format", "coco",
                           "--model-version", model_version, "--out", str(out))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 24
    regions = [(t, r) for t, p in drafts.items() for r in p[0]["result"]]
    assert len(coco["annotations"]) == len(regions)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted((a["image_id"], names[a["category_id"]]) for a in coco["annotations"]) == sorted(
        (t, r["value"]["polygonlabels"][0]) for t, r in regions)


def test_submitted_annotation_reaches_the_webhook_and_is_acknowledged(label_studio, backend):
    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    tasks = add_images(label_studio, project["id"])
    connect(label_studio, backend, project["id"])
    before = backend.metric('sam_webhooks_total{action="ANNOTATION_CREATED"}')
    polygon = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": WIDTH,
               "original_height": HEIGHT, "image_rotation": 0,
               "value": {"points": [[10, 10], [50, 10], [50, 50]], "closed": True, "polygonlabels": ["Object"]}}
    created = label_studio.api("POST", f"/api/tasks/{tasks[0]['id']}/annotations", json={"result": [polygon]})
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 30
    while backend.metric('sam_webhooks_total{action="ANNOTATION_CREATED"}') <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert backend.metric('sam_webhooks_total{action="ANNOTATION_CREATED"}') == before + 1
    # answered 200 inside Label Studio's 1 s webhook timeout: no training runs inline
    ok = backend.metric('sam_request_seconds_count{route="/webhook",status="200"}')
    within = backend.metric('sam_request_seconds_bucket{le="1.0",route="/webhook",status="200"}')
    assert ok >= 1 and within == ok


def test_warm_project_embeds_every_image_before_the_first_click(label_studio, backend):
    project = create_project(label_studio, ROOT / "label_config" / "brush_and_polygon.xml")
    tasks = add_images(label_studio, project["id"])
    ml_id = connect(label_studio, backend, project["id"])
    result = backend.cli("warm", "--project", str(project["id"]), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 images, 2 queued" in result.stdout
    again = backend.cli("warm", "--project", str(project["id"]))
    assert again.returncode == 0 and "2 images" in again.stdout
    fetched = backend.metric("sam_image_fetch_seconds_count")
    encoded = backend.metric("sam_encoder_seconds_count")
    label, context = prompt_contexts(project["label_config"])[0]
    for task in tasks:
        response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                    json={"task": task["id"], "context": context})
        assert response.status_code == 200, response.text
        check_regions(project["label_config"], response.json()["data"]["result"], label)
    # the clicks found both images embedded by the worker: no download, no encoder on the click path
    assert backend.metric("sam_image_fetch_seconds_count") == fetched
    assert backend.metric("sam_encoder_seconds_count") == encoded


def test_imported_images_are_embedded_before_anyone_asks(label_studio, backend, e2e_redis):
    """Label Studio's TASKS_CREATED webhook queues the new images; the worker `serve` runs embeds them."""
    import redis

    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    connect(label_studio, backend, project["id"])  # registers the project webhook
    store = redis.Redis.from_url(e2e_redis.url)
    before = len(store.keys("sam-backend:emb:*"))
    tasks = add_images(label_studio, project["id"])  # an upload and a storage sync: two imports
    deadline = time.monotonic() + 90
    while len(store.keys("sam-backend:emb:*")) < before + len(tasks) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(store.keys("sam-backend:emb:*")) == before + len(tasks)
    assert backend.metric('sam_webhooks_total{action="TASKS_CREATED"}') >= 2


def test_a_forged_tasks_created_webhook_embeds_only_what_label_studio_has(label_studio, backend, e2e_redis):
    """TASKS_CREATED comes without auth: its payload only names tasks. The backend reads them from
    Label Studio, so a forged image URL is never queued and tasks of other projects (or none) are ignored."""
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    connect(label_studio, backend, project["id"])
    other = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")  # not connected
    ours = add_images(label_studio, project["id"])
    theirs = label_studio.api("POST", f"/api/projects/{other['id']}/import", files={
        "file": ("theirs.png", make_image(WIDTH, HEIGHT, seed=900), "image/png")})
    assert theirs.status_code == 201, theirs.text
    their_task = label_studio.api("GET", "/api/tasks", params={"project": other["id"]}).json()["tasks"][0]
    store = redis.Redis.from_url(e2e_redis.url)
    forged = "http://127.0.0.1:1/forged.png"
    payload = {"action": "TASKS_CREATED", "project": {"id": project["id"], "label_config": "<View/>"},
               "tasks": [{"id": ours[0]["id"], "data": {"image": forged}},  # a real task, a forged URL
                         {"id": their_task["id"], "data": {"image": forged + "?2"}},  # another project's task
                         {"id": 987654321, "data": {"image": forged + "?3"}}]}  # no such task
    answer = requests.post(backend.url + "/webhook", json=payload, timeout=10)
    assert answer.status_code == 200 and answer.json()["queued"] == 1
    deadline = time.monotonic() + 60
    looked_up = None
    while time.monotonic() < deadline:
        keys = [k.decode() for k in store.keys("rq:job:created-*")]
        jobs_done = [Job.fetch(k.split(":", 2)[2], connection=store, serializer=JSONSerializer) for k in keys]
        looked_up = [j for j in jobs_done if j.args == [project["id"], [t["id"] for t in payload["tasks"]]]]
        if looked_up and looked_up[0].get_status() == "finished":
            break
        time.sleep(0.5)
    assert looked_up and looked_up[0].get_status() == "finished"
    # read from Label Studio: one of the three exists in this project
    result = looked_up[0].return_value()
    assert (result["project"], result["asked"], result["found"]) == (project["id"], 3, 1)
    # every job in the store, by its arguments: the forged URLs and the other project's image are in none
    arguments = []
    for key in store.keys("rq:job:*"):
        if store.type(key) == b"hash":
            arguments.append(json.dumps(Job.fetch(key.decode().split(":", 2)[2], connection=store,
                                                  serializer=JSONSerializer).args))
    assert arguments and not [a for a in arguments if "forged" in a or their_task["data"]["image"] in a]
    assert any(ours[0]["data"]["image"] in a for a in arguments)  # the task's own image, from Label Studio


def test_opening_a_task_embeds_the_next_ones(label_studio, backend, e2e_redis):
    import redis

    from backend.jobs import queues as jobs

    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    folder = label_studio.files_root / f"p{project['id']}"
    folder.mkdir()
    for i in range(6):
        (folder / f"shelf{i}.png").write_bytes(make_image(WIDTH, HEIGHT, seed=500 + i))
    local_storage(label_studio, project["id"], folder, sync=True)
    task_ids = sorted(t["id"] for t in label_studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"])
    connect(label_studio, backend, project["id"])  # after the import: no TASKS_CREATED warming here
    store = redis.Redis.from_url(e2e_redis.url)
    before = len(store.keys("sam-backend:emb:*"))
    # what Label Studio sends when an annotator opens the first task: a batch predict of that task
    opened = label_studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                                 "project": project["id"]},
                              json={"selectedItems": {"all": False, "included": [task_ids[0]]}})
    assert opened.status_code == 200, opened.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = jobs.job_counts(store)
        idle = all(c["queued"] == 0 and c["running"] == 0 for c in counts.values())
        if idle and len(store.keys("sam-backend:emb:*")) >= before + 4:
            break
        time.sleep(0.5)
    # the opened task (pre-labelled) and the 3 after it (PREFETCH_TASKS), not the last two
    assert len(store.keys("sam-backend:emb:*")) == before + 4


def test_images_download_with_a_personal_access_token_when_legacy_tokens_are_off(
    label_studio, tiny_checkpoint, e2e_redis, tmp_path
):
    """Runs last in this module: it turns legacy tokens off for the organisation, then back on."""
    config_path = ROOT / "label_config" / "brush_and_polygon.xml"
    project = create_project(label_studio, config_path)
    tasks = add_images(label_studio, project["id"])
    pat = label_studio.api("POST", "/api/token/").json()["token"]
    refreshed = label_studio.api("POST", "/api/token/refresh/", json={"refresh": pat}, auth="")
    bearer = f"Bearer {refreshed.json()['access']}"
    settings = label_studio.api("GET", "/api/jwt/settings").json()
    off = label_studio.api("POST", "/api/jwt/settings", json=dict(settings, legacy_api_tokens_enabled=False))
    assert off.status_code in (200, 201), off.text
    try:
        upload_url = next(t["data"]["image"] for t in tasks if "/upload/" in t["data"]["image"])
        assert label_studio.api("GET", upload_url).status_code == 401  # the legacy token is really off

        backend = BackendServer(tmp_path, tiny_checkpoint, e2e_redis.url, label_studio.url, pat)
        try:
            ml = label_studio.api("POST", "/api/ml", auth=bearer, json={
                "project": project["id"], "url": backend.url, "is_interactive": True, "title": "SAM (PAT)",
                "auth_method": "BASIC_AUTH", "basic_auth_user": backend.env["BASIC_AUTH_USER"],
                "basic_auth_pass": backend.env["BASIC_AUTH_PASS"]})
            assert ml.status_code == 201, ml.text
            label, context = prompt_contexts(config_path.read_text())[0]
            for task in tasks:
                response = label_studio.api("POST", f"/api/ml/{ml.json()['id']}/interactive-annotating",
                                            auth=bearer, json={"task": task["id"], "context": context})
                assert response.status_code == 200, response.text
                check_regions(config_path.read_text(), response.json()["data"]["result"], label)
            assert backend.metric("sam_image_fetch_seconds_count") == 2  # both images downloaded with the PAT
        finally:
            backend.stop()
    finally:
        label_studio.api("POST", "/api/jwt/settings", auth=bearer, json=dict(settings, legacy_api_tokens_enabled=True))


def test_annotations_train_a_head_that_the_backend_serves_live(label_studio, backend):
    """Real annotations in Label Studio -> START_TRAINING from Label Studio -> a train job on the
    backend's worker -> a versioned head; `train` again from the CLI; rollback; clicks report the head."""
    from backend.labelstudio.rle import mask_to_rle
    from model.registry import HeadRegistry
    from model.train import held_out

    project = create_project(label_studio, ROOT / "label_config" / "brush_and_polygon.xml")
    pid = project["id"]
    folder = label_studio.files_root / f"p{pid}"
    folder.mkdir()
    ml_id = connect(label_studio, backend, pid)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    index = 0
    while True:  # until a task falls in the held-out split (one in five, fixed by task id)
        name = f"train{index:02d}.png"
        (folder / name).write_bytes(make_image(WIDTH, HEIGHT, seed=600 + index))
        imported = label_studio.api("POST", f"/api/projects/{pid}/import",
                                    json=[{"data": {"image": f"/data/local-files/?d=p{pid}/{name}"}}])
        assert imported.status_code == 201, imported.text
        index += 1
        ids = [t["id"] for t in label_studio.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"]]
        if index >= 6 and any(held_out(i) for i in ids) and sum(not held_out(i) for i in ids) >= 2:
            break
    local_storage(label_studio, pid, folder, sync=False)

    def brush(cx: float, cy: float, r: float) -> dict:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        return {"from_name": "brush", "to_name": "image", "type": "brushlabels", "original_width": WIDTH,
                "original_height": HEIGHT, "image_rotation": 0,
                "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Object"]}}

    draft = label_studio.api("POST", "/api/predictions", json={"task": ids[0], "model_version": "sam-e2e-draft",
                                                                "result": [brush(30, 30, 12)], "score": 0.5})
    assert draft.status_code == 201, draft.text
    for n, task_id in enumerate(ids):  # two objects per image, as an annotator would submit them
        annotation = {"result": [brush(25 + n % 5, 30, 12), brush(70, 40 + n % 4, 9)]}
        if task_id == ids[0]:
            annotation["parent_prediction"] = draft.json()["id"]  # corrected from our draft
        created = label_studio.api("POST", f"/api/tasks/{task_id}/annotations", json=annotation)
        assert created.status_code == 201, created.text

    registry = HeadRegistry(Path(backend.env["MODEL_DIR"]) / "heads")
    trained = label_studio.api("POST", f"/api/ml/{ml_id}/train")  # the "Start training" button
    assert trained.status_code == 200, trained.text
    deadline = time.monotonic() + 240
    while not registry.versions(pid) and time.monotonic() < deadline:
        time.sleep(1)
    [first] = registry.versions(pid)
    TIMINGS["training run"] = first.meta["train_seconds"]
    assert first.meta["base_model_id"] in backend.model_version()
    assert first.meta["corrections"]["train"] + first.meta["corrections"]["heldout"] == 2 * len(ids)
    assert set(first.meta["metrics"]["candidate"]) >= {"miou", "miou_click", "miou_box", "boundary_iou", "noc85", "noc90"}
    assert backend.metric(f'sam_draft_corrections{{model_version="sam-e2e-draft",project="{pid}"}}') == 1

    # the CLI: queue a run on the worker, wait, print base / served / candidate
    again = backend.cli("train", "--project", str(pid))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "candidate" in again.stdout and "v0002" in again.stdout
    assert [v.version for v in registry.versions(pid)] == ["v0001", "v0002"]

    # serve v0001, whatever the gate said about it: clicks through Label Studio report it at once
    rolled = backend.cli("heads", "--project", str(pid), "--rollback", "v0001")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    context = {"result": [{"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": WIDTH,
                           "original_height": HEIGHT, "image_rotation": 0,
                           "value": {"x": 30.0, "y": 40.0, "width": 1.0, "keypointlabels": ["Object"]},
                           "is_positive": True}]}
    response = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                                json={"task": ids[0], "context": context})
    assert response.status_code == 200, response.text
    assert response.json()["data"]["model_version"].endswith(f"+head-p{pid}-v0001")
    listing = backend.cli("heads", "--project", str(pid))
    assert "* v0001" in listing.stdout and "v0002" in listing.stdout


def test_commands_name_a_wrong_project_or_a_refused_token_without_a_traceback(label_studio, backend):
    # Label Studio SDK errors used to escape as tracebacks; one place now turns them into messages
    for command in ("warm", "prelabel", "export"):
        result = backend.cli(command, "--project", "987654")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert "987654" in result.stderr and "404" in result.stderr and label_studio.url in result.stderr
    revoked = backend.cli_with({"LABEL_STUDIO_API_KEY": "0" * 40}, "warm", "--project", "1")
    assert revoked.returncode == 2 and "Traceback" not in revoked.stderr
    assert "401" in revoked.stderr and "LABEL_STUDIO_API_KEY" in revoked.stderr


def ml_settings(ls, backend: BackendServer, ml_id: int, project_id: int, **changes) -> None:
    """Change an ML backend as its Settings -> Model form does (Label Studio checks the whole form again)."""
    form = {"url": backend.url, "project": project_id, "auth_method": "BASIC_AUTH",
            "basic_auth_user": backend.env["BASIC_AUTH_USER"], "basic_auth_pass": backend.env["BASIC_AUTH_PASS"]}
    changed = ls.api("PATCH", f"/api/ml/{ml_id}", json={**form, **changes})
    assert changed.status_code == 200, changed.text


def doctor_lines(result) -> dict[str, str]:
    """{check: its status} from `sam-backend doctor`'s output."""
    found = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("OK", "FAIL", "WARN", "SKIP"):
            found.setdefault(rest.strip().split(":")[0], status)
    return found


DOCTOR_CHECKS = ["Label Studio reachable with the token", "backend registered with the project",
                 "backend reachable from Label Studio (/health, /setup)", "interactive preannotations on",
                 "label config usable by the smart tools", "editor pre-fills our drafts",
                 "first task's image downloadable by the backend",
                 "a smart-tool click through Label Studio returns a region", "workers listening for drafts",
                 "Redis writable, queues safe from eviction"]


def test_doctor_passes_on_a_working_project_and_names_what_breaks_it(label_studio, backend, tmp_path):
    """One connected project: every check passes; then interactive preannotations off, and a job store
    with no worker on it that would evict queues, each named with what to change. connect warns about
    every image host the backend will refuse, by host and port."""
    from tests.conftest import RedisServer

    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    pid = project["id"]
    upload = label_studio.api("POST", f"/api/projects/{pid}/import",
                              files={"file": ("first.png", make_image(WIDTH, HEIGHT, seed=700), "image/png")})
    assert upload.status_code == 201, upload.text
    elsewhere = free_port()  # Label Studio's host on another port: not Label Studio's origin
    refused = [f"http://127.0.0.1:{elsewhere}/shelf.png", "http://images.example.invalid:8443/bin.png"]
    imported = label_studio.api("POST", f"/api/projects/{pid}/import", json=[{"data": {"image": u}} for u in refused])
    assert imported.status_code == 201, imported.text
    connected = backend.cli("connect", "--project", str(pid), "--url", backend.url)
    assert connected.returncode == 0, connected.stdout + connected.stderr
    warnings = [line for line in connected.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert any(f"127.0.0.1:{elsewhere} is not allowed" in w for w in warnings)
    assert any("images.example.invalid:8443 is not allowed" in w for w in warnings)
    ml_id = label_studio.api("GET", "/api/ml", params={"project": pid}).json()[0]["id"]

    healthy = backend.cli("doctor", "--project", str(pid))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    lines = doctor_lines(healthy)
    assert [c for c in lines if lines[c] == "OK"] == DOCTOR_CHECKS, healthy.stdout
    assert "2 task(s)" not in healthy.stdout and healthy.stdout.count("WARN other tasks' images") == 2

    ml_settings(label_studio, backend, ml_id, pid, is_interactive=False)
    try:
        off = backend.cli("doctor", "--project", str(pid))
    finally:
        ml_settings(label_studio, backend, ml_id, pid, is_interactive=True)
    assert off.returncode == 1
    lines = doctor_lines(off)
    assert lines["interactive preannotations on"] == "FAIL"
    assert lines["a smart-tool click through Label Studio returns a region"] == "FAIL"
    assert "Model is not set to be used for interactive preannotations" in off.stdout
    assert [c for c in DOCTOR_CHECKS if lines[c] == "FAIL"] == [
        "interactive preannotations on", "a smart-tool click through Label Studio returns a region"]

    store = RedisServer(tmp_path)  # a job store no worker listens on, set to evict
    try:
        redis.Redis.from_url(store.url).config_set("maxmemory-policy", "allkeys-lru")
        unserved = backend.cli_with({"REDIS_URL": store.url}, "doctor", "--project", str(pid))
    finally:
        store.stop()
    assert unserved.returncode == 1
    lines = doctor_lines(unserved)
    assert [c for c in DOCTOR_CHECKS if lines[c] == "FAIL"] == [
        "workers listening for drafts", "Redis writable, queues safe from eviction"]
    assert "sam-warm, sam-prelabel" in unserved.stdout and "allkeys-lru" in unserved.stdout


def test_doctor_names_a_missing_backend_a_config_without_smart_tools_and_a_refused_image_host(
        label_studio, backend):
    config = (ROOT / "label_config" / "single_object_polygon.xml").read_text().replace(' smart="true"', "")
    created = label_studio.api("POST", "/api/projects", json={"title": "e2e doctor", "label_config": config})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    port = free_port()
    imported = label_studio.api("POST", f"/api/projects/{pid}/import",
                                json=[{"data": {"image": f"http://127.0.0.1:{port}/photo.png"}}])
    assert imported.status_code == 201, imported.text
    result = backend.cli("doctor", "--project", str(pid))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = doctor_lines(result)
    assert [c for c in DOCTOR_CHECKS if lines[c] == "FAIL"] == [
        "backend registered with the project", "label config usable by the smart tools",
        "first task's image downloadable by the backend"], result.stdout
    assert f"sam-backend connect --project {pid}" in result.stdout
    assert 'smart="true"' in result.stdout
    assert f"127.0.0.1:{port} is not allowed" in result.stdout and "ALLOWED_IMAGE_HOSTS" in result.stdout
    assert lines["a smart-tool click through Label Studio returns a region"] == "SKIP"


def test_doctor_names_a_refused_token_and_a_registered_backend_that_no_longer_answers(
        label_studio, backend, tiny_checkpoint, e2e_redis, tmp_path):
    """A wrong (or revoked) token fails the first check, by its name and with the variable to change;
    a backend registered at a URL whose server has stopped fails Label Studio's own /health check,
    with that URL named."""
    project = create_project(label_studio, ROOT / "label_config" / "single_object_polygon.xml")
    pid = project["id"]
    upload = label_studio.api("POST", f"/api/projects/{pid}/import",
                              files={"file": ("first.png", make_image(WIDTH, HEIGHT, seed=701), "image/png")})
    assert upload.status_code == 201, upload.text

    refused = backend.cli_with({"LABEL_STUDIO_API_KEY": "0" * 40}, "doctor", "--project", str(pid))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    lines = doctor_lines(refused)
    assert lines["Label Studio reachable with the token"] == "FAIL", refused.stdout
    [line] = [x for x in refused.stdout.splitlines() if x.startswith("FAIL Label Studio reachable with the token")]
    assert "401" in line and "LABEL_STUDIO_API_KEY" in line
    # nothing else can be asked of Label Studio without the token: skipped, not reported broken
    assert lines["backend registered with the project"] == "SKIP"

    (tmp_path / "gone").mkdir()
    gone = BackendServer(tmp_path / "gone", tiny_checkpoint, e2e_redis.url, label_studio.url, label_studio.token)
    try:
        connected = gone.cli("connect", "--project", str(pid), "--url", gone.url)
        assert connected.returncode == 0, connected.stdout + connected.stderr
    finally:
        gone.stop()  # registered with the project, then its server stopped: the URL no longer answers
    stopped = backend.cli("doctor", "--project", str(pid), "--url", gone.url)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    lines = doctor_lines(stopped)
    assert lines["Label Studio reachable with the token"] == "OK"
    assert lines["backend registered with the project"] == "OK"
    assert lines["backend reachable from Label Studio (/health, /setup)"] == "FAIL", stopped.stdout
    [line] = [x for x in stopped.stdout.splitlines()
              if x.startswith("FAIL backend reachable from Label Studio (/health, /setup)")]
    assert gone.url in line and "Start the backend" in line
