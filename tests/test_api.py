"""The HTTP API against a real Redis server and the small random SAM, replaying Label Studio's own bodies."""

from __future__ import annotations

import base64
import copy
import threading

import numpy as np
import pytest
import redis
from label_studio_sdk.label_interface import LabelInterface
from werkzeug.serving import make_server

from backend.jobs import queues as jobs
from backend.web.app import create_app
from backend.pipeline.embeddings import EmbeddingCache
from backend.labelstudio.rle import rle_to_mask
from model.masks import logits_at_input, mask_at_original
from model.prompts import Prompt, to_model
from model.sam import SamModel
from tests.conftest import TOKEN, free_port, make_image, protocol_body, work_queues

LOCAL_IMAGE = "/data/local-files/?d=local/img_local.png"


def keypoint_body() -> dict:
    return copy.deepcopy(protocol_body("predict_interactive_keypointlabels.json"))


def rect_body() -> dict:
    return copy.deepcopy(protocol_body("predict_interactive_rectanglelabels.json"))


def with_image(body: dict, url: str) -> dict:
    body["tasks"][0]["data"]["image"] = url
    return body


def run_warm_worker(settings) -> None:
    """A real RQ worker (the code `sam-backend worker` runs), in burst mode: it empties the queue and returns."""
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0


def metric(client, name: str) -> float:
    """Sum of a Prometheus sample across labels, read from /metrics."""
    total = 0.0
    for line in client.get("/metrics").data.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def validate(body: dict, result: dict) -> None:
    interface = LabelInterface(body["label_config"])
    prediction = {"result": result["result"], "score": result["score"], "model_version": result["model_version"]}
    errors = interface.validate_prediction(prediction, return_errors=True)
    assert errors is True or errors == [] or errors is None, errors


@pytest.fixture
def served(image_server):
    image_server.add(LOCAL_IMAGE, make_image(80, 60))
    return image_server


def test_health_and_setup_are_fast_and_load_nothing(client, served):
    c, services = client
    health = c.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP"
    setup = c.post("/setup", json=protocol_body("setup.json"))
    assert setup.status_code == 200
    assert setup.json["model_version"] == services.loader.model_version
    assert setup.json["model_version"].startswith("sam-custom32x2-")
    assert services.loader._model is None  # no model load on /setup
    assert served.requests == []  # and no network


def test_keypoint_click_returns_valid_brush_and_polygon_of_the_right_mask(client, served, tiny_checkpoint):
    c, services = client
    body = keypoint_body()
    response = c.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == 1
    result = results[0]
    validate(body, result)
    kinds = {r["type"]: r for r in result["result"]}
    assert "brushlabels" in kinds
    brush = kinds["brushlabels"]
    assert brush["from_name"] == "brush" and brush["to_name"] == "image"
    assert brush["value"]["brushlabels"] == ["Object"]
    assert (brush["original_width"], brush["original_height"]) == (80, 60)
    mask = rle_to_mask(brush["value"]["rle"], 60, 80)

    # the same prompt straight through the model: positive (37.5 %, 41.67 %), negative (80 %, 80 %)
    model = SamModel.load(tiny_checkpoint, services.loader.digest, "cpu")
    from backend.pipeline.images import decode_image

    image = decode_image(make_image(80, 60), 10**8)
    features = model.encode(image.input_image).astype(np.float16).astype(np.float32)
    prompt = Prompt(((0.375, 0.416667), (0.8, 0.8)), (1, 0))
    low, _ = model.decode_torch(features, to_model(prompt, image.input_size))
    expected = mask_at_original(logits_at_input(low, image.input_size), (60, 80))
    agreement = (mask == expected).mean()
    assert agreement > 0.99, agreement

    for region in result["result"]:
        if region["type"] == "polygonlabels":
            assert region["from_name"] == "poly"
            assert region["value"]["closed"] is True
            assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in region["value"]["points"])
    # the image was fetched from the Label Studio-relative URL with the legacy token
    assert (LOCAL_IMAGE, f"Token {TOKEN}") in served.requests


def test_box_click_is_valid(client, served):
    c, _ = client
    body = rect_body()
    response = c.post("/predict", json=body)
    assert response.status_code == 200, response.json
    validate(body, response.json["results"][0])
    assert response.json["results"][0]["result"]


def test_output_type_picks_one_kind_when_both_exist(settings, make_client, served):
    c, _ = make_client(settings.replace(output_type="polygon"))
    response = c.post("/predict", json=keypoint_body())
    assert response.status_code == 200
    assert {r["type"] for r in response.json["results"][0]["result"]} <= {"polygonlabels"}
    c, _ = make_client(settings.replace(output_type="brush"))
    response = c.post("/predict", json=keypoint_body())
    assert [r["type"] for r in response.json["results"][0]["result"]] == ["brushlabels"]


def test_second_click_uses_cache_and_a_new_worker_reads_it_from_redis(settings, make_client, served):
    c1, s1 = make_client(settings)
    assert c1.post("/predict", json=keypoint_body()).status_code == 200
    assert metric(c1, "sam_encoder_seconds_count") == 1
    assert c1.post("/predict", json=rect_body()).status_code == 200
    assert metric(c1, "sam_encoder_seconds_count") == 1  # encoder ran once for two clicks

    c2, s2 = make_client(settings)  # another worker: empty LRU, same Redis
    first = c2.post("/predict", json=keypoint_body())
    assert first.status_code == 200
    assert metric(c2, "sam_encoder_seconds_count") == 0
    assert metric(c2, 'sam_embedding_cache_total{result="hit_redis"}') == 1
    keys = redis.Redis.from_url(settings.redis_url).keys("sam-backend:emb:*")
    assert len(keys) == 1 and s1.loader.model_id in keys[0].decode()


def test_redis_outage_never_fails_a_click(settings, make_client, served):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    c, _ = make_client(settings.replace(redis_url=dead))
    response = c.post("/predict", json=keypoint_body())
    assert response.status_code == 200
    assert response.json["results"][0]["result"]
    assert metric(c, "sam_redis_errors_total") >= 1


def test_batch_predict_returns_one_entry_per_task_in_order_and_queues_drafts(client, served, settings):
    c, services = client
    body = copy.deepcopy(protocol_body("predict_batch.json"))
    response = c.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == len(body["tasks"]) == 3
    assert all(r["model_version"] == services.loader.model_version for r in results)
    # no entry has a "result", so Label Studio stores no empty prediction; a job per task drafts it
    assert all("result" not in r for r in results)
    store = redis.Redis.from_url(settings.redis_url)
    queued = jobs.queue(store, jobs.PRELABEL_QUEUE).job_ids
    assert sorted(queued) == sorted(jobs.prelabel_job_id(services.loader.model_id, t["id"]) for t in body["tasks"])
    # the same batch again while the jobs wait (Label Studio calls on every task open): nothing twice
    c.post("/predict", json=body)
    assert len(jobs.queue(store, jobs.PRELABEL_QUEUE).job_ids) == 3
    assert metric(c, 'sam_prelabel_jobs_total{result="queued"}') == 3


def test_batch_predict_without_a_project_warms_the_images(client, served, settings):
    c, services = client
    body = copy.deepcopy(protocol_body("predict_batch.json"))
    del body["project"]
    body["tasks"][2]["data"]["image"] = "/data/upload/1/e13a3064-img_upload.png"
    served.add("/data/upload/1/e13a3064-img_upload.png", make_image(64, 48, seed=3))
    assert c.post("/predict", json=body).status_code == 200
    assert metric(c, 'sam_warm_jobs_total{result="queued"}') == 3
    run_warm_worker(settings)
    # tasks 1 and 3 warmed into Redis; task 2's host (another port) is not allowed: its job failed
    store = redis.Redis.from_url(settings.redis_url)
    assert len(store.keys("sam-backend:emb:*")) == 2
    assert jobs.queue(store).failed_job_registry.count == 1
    click = c.post("/predict", json=keypoint_body())
    assert click.status_code == 200
    assert metric(c, "sam_encoder_seconds_count") == 0  # the worker encoded; the click found it warm


def test_basic_auth(settings, make_client, served):
    c, _ = make_client(settings.replace(basic_auth_user="ls", basic_auth_pass="s3cret"))
    denied = c.post("/predict", json=keypoint_body())
    assert denied.status_code == 401 and "basic auth" in denied.json["error"]
    assert c.post("/setup", json=protocol_body("setup.json")).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    assert c.post("/predict", json=keypoint_body(), headers=bad).status_code == 401
    assert c.post("/predict", json=keypoint_body(), headers=good).status_code == 200
    # project webhooks come without basic auth; START_TRAINING comes with it
    assert c.post("/webhook", json=protocol_body("webhook_annotation_created.json")).status_code == 200
    assert c.post("/webhook", json=protocol_body("webhook_start_training.json")).status_code == 401
    assert c.post("/webhook", json=protocol_body("webhook_start_training.json"), headers=good).status_code == 200


@pytest.mark.parametrize(
    "mutate, status, words",
    [
        (lambda b: b["params"]["context"]["result"][0].update(type="brushlabels"), 400, "brushlabels"),
        (lambda b: b["params"]["context"]["result"][0]["value"].update(x=250), 400, "outside the image"),
        (lambda b: b["params"]["context"]["result"][0].update(image_rotation=90), 422, "rotated"),
        (lambda b: b.update(label_config="<View><Text name='t' value='$text'/></View>"), 422, "Image"),
        (lambda b: b["tasks"][0]["data"].update(image="/data/upload/missing.png"), 502, "404"),
        (lambda b: b["tasks"][0]["data"].update(image="http://localhost:1/x.png"), 403, "ALLOWED_IMAGE_HOSTS"),
        (lambda b: b["tasks"][0]["data"].pop("image"), 400, "data.image"),
        (lambda b: [r["value"].update(keypointlabels=["Car"]) for r in b["params"]["context"]["result"]], 422, "'Car'"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_loses_nothing(client, served, settings, mutate, status, words):
    c, _ = client
    assert c.post("/predict", json=keypoint_body()).status_code == 200
    store = redis.Redis.from_url(settings.redis_url)
    before = {k: store.get(k) for k in store.keys("sam-backend:emb:*")}
    body = keypoint_body()
    mutate(body)
    response = c.post("/predict", json=body)
    assert response.status_code == status, response.json
    assert words in response.json["error"]
    assert {k: store.get(k) for k in store.keys("sam-backend:emb:*")} == before
    assert c.post("/predict", json=keypoint_body()).status_code == 200  # still serving


def test_malformed_json_and_unknown_routes(client):
    c, _ = client
    response = c.post("/predict", data="{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json["error"]
    assert c.get("/nope").status_code == 404
    assert c.post("/webhook", json={"no": "action"}).status_code == 400


def test_missing_checkpoint_reports_where_to_put_it(settings, make_client, tmp_path):
    missing = tmp_path / "nowhere" / "sam.pth"
    c, _ = make_client(settings.replace(sam_checkpoint=str(missing)))
    health = c.get("/health")
    assert health.status_code == 503 and str(missing) in health.json["error"]
    response = c.post("/predict", json=keypoint_body())
    assert response.status_code == 503 and str(missing) in response.json["error"]


def test_setup_token_is_the_fallback_for_images_when_basic_auth_proves_the_caller(settings, make_client, served):
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
    bare = settings.replace(label_studio_url=None, label_studio_api_key=None, basic_auth_user="ls",
                            basic_auth_pass="secret")
    c, _ = make_client(bare)
    refused = c.post("/predict", json=keypoint_body(), headers=auth)  # relative URL, no Label Studio known
    # the server lacks a setting; the caller did nothing wrong: 503 naming it, not 400 "malformed"
    assert refused.status_code == 503 and "LABEL_STUDIO_URL" in refused.json["error"]
    setup = protocol_body("setup.json")
    setup.update(hostname=served.url, access_token=TOKEN)
    assert c.post("/setup", json=setup, headers=auth).status_code == 200
    assert c.post("/predict", json=keypoint_body(), headers=auth).status_code == 200
    # another worker that never saw /setup finds it through Redis
    c2, _ = make_client(bare)
    assert c2.post("/predict", json=keypoint_body(), headers=auth).status_code == 200


def test_concurrent_clicks_on_four_images_match_serial_clicks(settings, make_client, image_server):
    """8 threads x 4 images over real HTTP (threaded server) give the same masks as one-by-one clicks."""
    import requests

    urls = []
    for i in range(4):
        urls.append(image_server.add(f"/data/upload/img{i}.png", make_image(96 + 8 * i, 72, seed=i)))
    points = [(30.0, 40.0), (60.0, 50.0)]

    def body(url, point):
        b = with_image(keypoint_body(), url)
        region = b["params"]["context"]["result"][0]
        region["value"].update(x=point[0], y=point[1])
        b["params"]["context"]["result"] = [region]
        return b

    jobs = [(u, p) for u in urls for p in points]  # 8 distinct clicks
    _, services = make_client(settings)
    app = create_app(settings, services, preload=False)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        concurrent: dict = {}
        barrier = threading.Barrier(len(jobs))

        def click(job):
            barrier.wait()
            r = requests.post(base + "/predict", json=body(*job), timeout=300)
            concurrent[job] = r

        threads = [threading.Thread(target=click, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert metric(app.test_client(), "sam_encoder_seconds_count") == 4  # each image encoded once
        serial = {job: requests.post(base + "/predict", json=body(*job), timeout=300) for job in jobs}
    finally:
        server.shutdown()

    def brush_mask(response, url):
        assert response.status_code == 200, response.text
        region = next(r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels")
        return rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])

    for job in jobs:
        a, b = brush_mask(concurrent[job], job[0]), brush_mask(serial[job], job[0])
        assert a.shape == b.shape
        assert np.array_equal(a, b), job
    # the masks differ between images: no request got another image's mask
    masks = [brush_mask(serial[(u, points[0])], u) for u in urls]
    assert len({m.shape for m in masks}) == 4


def test_url_digest_lets_warm_clicks_skip_the_download(client, served):
    c, services = client
    assert c.post("/predict", json=keypoint_body()).status_code == 200
    downloads = len(served.requests)
    assert c.post("/predict", json=rect_body()).status_code == 200
    assert len(served.requests) == downloads
    assert EmbeddingCache.key(services.loader.model_id, "x").startswith("sam-backend:emb:")


def test_draft_has_one_mask_per_imported_box_with_its_label(client, served):
    from backend.labelstudio.label_config import parse_label_config
    from backend.pipeline.timings import Timings

    c, services = client
    body = copy.deepcopy(protocol_body("predict_batch.json"))
    box = copy.deepcopy(protocol_body("webhook_annotation_created.json")["annotation"]["result"][0])
    other = copy.deepcopy(box)
    other["value"].update(x=55, y=50, width=30, height=40)
    unknown = copy.deepcopy(box)
    unknown["value"]["rectanglelabels"] = ["Truck"]  # not in the output tags: skipped, not an error
    task = body["tasks"][0]
    task["predictions"] = [{"model_version": "detector-v3", "result": [box, other, unknown]}]
    config = parse_label_config(body["label_config"])
    embedding = services.embedder.for_url(task["data"]["image"])
    draft = services.predictor.draft(task, embedding, config, Timings())
    brushes = [r for r in draft["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 2 and all(r["value"]["brushlabels"] == ["Object"] for r in brushes)
    validate(body, draft)


def test_draft_without_boxes_segments_everything_above_the_minimum_area(settings, make_client, served):
    from backend.labelstudio.label_config import parse_label_config
    from backend.pipeline.timings import Timings

    body = copy.deepcopy(protocol_body("predict_batch.json"))
    config = parse_label_config(body["label_config"])
    task = body["tasks"][0]
    # thresholds at zero: the random test SAM's every candidate counts, so objects are found
    c, services = make_client(settings.replace(prelabel_min_area=0.0, prelabel_points_per_side=4))
    import model.automatic as automatic

    lenient = automatic.AutomaticConfig(points_per_side=4, pred_iou_thresh=-10, stability_thresh=0,
                                        min_area_fraction=0.0)
    embedding = services.embedder.for_url(task["data"]["image"])
    found = automatic.segment_everything(services.loader.get(), embedding.features, embedding.input_size, lenient)
    assert found and all(0 < f.area_fraction <= 1 for f in found)
    draft = services.predictor.draft(task, embedding, config, Timings(), automatic=lenient)
    brushes = [r for r in draft["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == len(found)  # one brush region per object found
    assert all(r["value"].get("brushlabels", r["value"].get("polygonlabels")) == ["Object"] for r in draft["result"])
    validate(body, draft)
    # an object larger than the whole image cannot exist: a 100 % minimum area leaves nothing
    c, strict = make_client(settings.replace(prelabel_min_area=100.0, prelabel_points_per_side=4))
    assert strict.predictor.draft(task, embedding, config, Timings())["result"] == []


def test_tasks_created_webhook_queues_a_look_up_of_the_new_tasks(client, settings):
    c, services = client
    project = protocol_body("webhook_project_updated.json")["project"]
    tasks = copy.deepcopy(protocol_body("predict_batch.json")["tasks"])
    ids = [t["id"] for t in tasks]
    answer = c.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks + tasks, "project": project})
    assert answer.status_code == 200 and answer.json["tasks"] == len(ids) and answer.json["queued"] == 1
    store = redis.Redis.from_url(settings.redis_url)
    # one job that reads the tasks from Label Studio (tests/e2e runs it against a real one): the
    # payload's image URLs and label config are not what gets embedded
    assert [(j.func_name, j.args) for j in jobs.queue(store).jobs] == [
        ("backend.jobs.tasks.warm_created_tasks", [project["id"], ids])]
    # the same webhook again while that job waits queues nothing more
    again = c.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks, "project": project})
    assert again.json["queued"] == 0 and jobs.queue(store).count == 1
    # without a project id there is nothing to read the tasks from
    orphan = c.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks})
    assert orphan.status_code == 200 and "queued" not in orphan.json and jobs.queue(store).count == 1


def test_opening_a_task_also_queues_the_next_ones(client, served, settings):
    c, services = client
    body = copy.deepcopy(protocol_body("predict_batch.json"))
    body["tasks"] = body["tasks"][:1]  # Label Studio's call when an annotator opens task 1
    assert c.post("/predict", json=body).status_code == 200
    store = redis.Redis.from_url(settings.redis_url)
    assert jobs.queue(store, jobs.PRELABEL_QUEUE).job_ids == [jobs.prelabel_job_id(services.loader.model_id, 1)]
    prefetch = jobs.queue(store, jobs.WARM_QUEUE).jobs
    assert [(j.func_name, j.args) for j in prefetch] == [("backend.jobs.tasks.warm_next_tasks", [1, 1, 3])]
    many = copy.deepcopy(protocol_body("predict_batch.json"))  # "Retrieve predictions" on 3 tasks: no prefetch
    assert c.post("/predict", json=many).status_code == 200
    assert len(jobs.queue(store, jobs.WARM_QUEUE).jobs) == 1


def test_a_model_that_cannot_be_built_answers_503_naming_the_cause(settings, make_client, served, monkeypatch):
    # a fake for a fault we cannot cause here (CUDA or memory failing while SAM is built)
    from model.sam import SamModel

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(SamModel, "load", broken)
    c, _ = make_client(settings)
    for _ in range(2):  # reported the same way every time, without building again
        response = c.post("/predict", json=protocol_body("predict_interactive_keypointlabels.json"))
        assert response.status_code == 503
        assert "could not be built" in response.json["error"] and "out of memory" in response.json["error"]


def test_batch_answer_says_no_draft_when_prelabel_on_predict_is_off(settings, make_client, served):
    c, _ = make_client(settings.replace(prelabel_on_predict=False))
    response = c.post("/predict", json=protocol_body("predict_batch.json"))
    assert response.status_code == 200
    assert {r["status"] for r in response.json["results"]} == {"no draft: PRELABEL_ON_PREDICT is off"}
    assert jobs.queue(redis.Redis.from_url(settings.redis_url), jobs.PRELABEL_QUEUE).count == 0
