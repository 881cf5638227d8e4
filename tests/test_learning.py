"""Learning from corrections: simulation and metrics, the head, the gate, the registry, training on
Label Studio-shaped annotations with the real SAM path, live reload in a serving worker, webhooks."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch

from backend.jobs import queues as jobs
from backend.bench.learn import CONFIG, annotated_task, corrections
from backend.labelstudio.corrections import draft_changes, task_objects
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.rle import mask_to_rle, rle_to_mask
from backend.commands.train import heads as heads_command, parse_every
from backend.jobs.training import acceptance_rows, train_on_tasks
from model.interactive import boundary_iou, first_click, iou, next_click, noc
from model.prompts import ModelPrompt
from model.refine import RefineHead
from model.registry import HeadError, HeadRegistry
from model.synthetic_domain import ShadowBleedBase, make_scene
from model.train import Segmenter, TrainConfig, evaluate, gate, held_out, split, train_and_gate
from tests.conftest import make_image, protocol_body
from tests.test_api import metric

SMALL = TrainConfig(steps=120, batch=8)


def disk(shape, cx, cy, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# ---------------------------------------------------------------- simulation and metrics

def test_clicks_follow_the_noc_protocol():
    gt = disk((100, 120), 60, 50, 30)
    first = first_click(gt)
    assert first.positive and abs(first.x - 60.5) <= 1.5 and abs(first.y - 50.5) <= 1.5
    missed = gt & ~disk((100, 120), 80, 50, 20)  # prediction misses the right part
    click = next_click(missed, gt)
    assert click.positive and click.x > 70
    extra = gt | disk((100, 120), 100, 50, 15)  # prediction spills to the right
    click = next_click(extra, gt)
    assert not click.positive and click.x > 90
    assert next_click(gt, gt) is None


def test_metrics():
    gt = disk((100, 120), 60, 50, 30)
    assert iou(gt, gt) == 1.0 and boundary_iou(gt, gt) == 1.0
    shifted = np.roll(gt, 3, axis=1)
    assert boundary_iou(shifted, gt) < iou(shifted, gt) < 1.0  # boundary IoU is the stricter one
    assert noc(lambda clicks: gt, gt) == {0.85: 1, 0.90: 1}
    assert noc(lambda clicks: np.zeros_like(gt), gt) == {0.85: 20, 0.90: 20}
    # a segmenter that needs a second click: fine only once it has two
    assert noc(lambda clicks: gt if len(clicks) >= 2 else gt & ~disk(gt.shape, 80, 50, 20), gt)[0.90] == 2


def test_held_out_split_is_by_task_and_stable():
    ids = list(range(1, 501))
    out = [i for i in ids if held_out(i)]
    assert 70 <= len(out) <= 130  # about one in five
    assert out == [i for i in ids if held_out(i)]
    scenes = corrections(0, 12, parse_label_config(CONFIG))
    train, heldout = split(scenes)
    assert {o.task_id for o in train}.isdisjoint({o.task_id for o in heldout})


# ---------------------------------------------------------------- head

def test_head_is_small_and_starts_as_plain_sam():
    head = RefineHead()
    assert head.parameter_count() <= 2_000_000
    scene = make_scene(3)
    base = ShadowBleedBase()
    prompt = ModelPrompt(np.array([[float(first_click(scene.gt).x), float(first_click(scene.gt).y)]], np.float32),
                         np.array([1]), None)
    logits = base(scene.features, prompt)
    refined = head.refine(scene.image, logits, prompt)
    assert refined.shape == logits.shape
    assert iou(refined > 0, logits > 0) > 0.99  # zero last layer: SAM's mask, up to crop resampling


# ---------------------------------------------------------------- training and the gate

@pytest.fixture(scope="module")
def trained():
    """A head trained on 24 corrections of the synthetic domain, with its held-out metrics."""
    config = parse_label_config(CONFIG)
    pool, heldout = corrections(0, 24, config), corrections(500, 8, config)
    outcome = train_and_gate(pool, heldout, ShadowBleedBase(), None, SMALL, margin=1.0)
    return pool, heldout, outcome


def test_gate_promotes_a_head_that_beats_plain_sam(trained):
    _, _, outcome = trained
    base, candidate = outcome.metrics["base"], outcome.metrics["candidate"]
    assert outcome.promoted, outcome.reason
    assert candidate["miou"] >= base["miou"] + 1.0
    assert candidate["noc90"] <= base["noc90"] and candidate["noc85"] <= base["noc85"]
    assert outcome.metrics["served"] == base  # nothing served yet: the bar is plain SAM


def test_gate_refuses_a_worse_head_and_says_why(trained):
    pool, heldout, outcome = trained
    worse = copy.deepcopy(outcome.head)
    with torch.no_grad():
        worse.out.weight.mul_(-1)  # the learned correction, reversed
        worse.out.bias.mul_(-1)
    base = ShadowBleedBase()
    served = evaluate(heldout, Segmenter(base, outcome.head))
    candidate = evaluate(heldout, Segmenter(base, worse))
    promoted, reason = gate(candidate, served, margin=1.0)
    assert not promoted and "mIoU" in reason
    # a candidate that is not better than the served head is refused too (a fresh run of 1 step ~ plain SAM)
    again = train_and_gate(pool, heldout, base, outcome.head, TrainConfig(steps=1, batch=8), margin=1.0)
    assert not again.promoted and "served" in again.reason


def test_gate_refuses_a_head_that_loses_on_noc():
    served = {"miou": 80.0, "noc85": 3.0, "noc90": 5.0}
    promoted, reason = gate({"miou": 85.0, "noc85": 3.0, "noc90": 5.5}, served, margin=1.0)
    assert not promoted and "NoC@90" in reason
    assert gate({"miou": 85.0, "noc85": 2.0, "noc90": 4.0}, served, margin=1.0)[0]


# ---------------------------------------------------------------- registry

def test_registry_versions_pointer_and_refusals(tmp_path, trained):
    head = trained[2].head
    registry = HeadRegistry(tmp_path)
    v1 = registry.save(7, head, {"base_model_id": "sam-a", "status": "promoted"})
    v2 = registry.save(7, RefineHead(), {"base_model_id": "sam-a", "status": "rejected", "reason": "no gain"})
    assert (v1.version, v2.version) == ("v0001", "v0002")
    assert [v.version for v in registry.versions(7)] == ["v0001", "v0002"]
    assert registry.current(7) is None
    registry.set_current(7, "v0001", "test")
    assert registry.current(7) == "v0001"
    loaded = registry.load(7, "v0001", "sam-a")
    x = torch.randn(1, 7, 96, 96)
    assert torch.equal(loaded(x), head.eval()(x))
    assert not list(registry.project_dir(7).glob(".*"))  # no staging or temporary files left

    with pytest.raises(HeadError, match="trained on base sam-a"):
        registry.load(7, "v0001", "sam-b")
    path = registry.project_dir(7) / "v0002" / "head.pt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(HeadError, match="corrupt"):
        registry.load(7, "v0002")
    with pytest.raises(HeadError):
        registry.set_current(7, "v0002", "must refuse")
    assert registry.current(7) == "v0001"  # a refused pointer change leaves the served head alone
    with pytest.raises(HeadError, match="not a head version"):
        registry.load(7, "../v0001")
    history = [json.loads(line) for line in (registry.project_dir(7) / "history.jsonl").read_text().splitlines()]
    assert history[-1]["to"] == "v0001"


def test_registry_refuses_a_pickle_with_code(tmp_path):
    """weights_only=True: a head.pt that would run code on load is refused (not executed)."""
    registry = HeadRegistry(tmp_path)
    saved = registry.save(3, RefineHead(), {"base_model_id": "sam-a", "status": "promoted"})
    path = registry.project_dir(3) / saved.version / "head.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    path.write_bytes(buffer.getvalue())
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()  # even with a matching digest
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HeadError, match="cannot be loaded"):
        registry.load(3, saved.version)


# ---------------------------------------------------------------- Label Studio annotations

def test_annotations_become_objects_and_draft_changes_are_measured():
    config = parse_label_config(protocol_body("predict_interactive_keypointlabels.json")["label_config"])
    gt = disk((60, 80), 40, 30, 15)
    brush = {"id": "b", "from_name": "brush", "to_name": "image", "type": "brushlabels", "original_width": 80,
             "original_height": 60, "value": {"format": "rle", "rle": mask_to_rle(gt), "brushlabels": ["Object"]}}
    square = [[10, 10], [30, 10], [30, 40], [10, 40]]
    poly = {"id": "p", "from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 80,
            "original_height": 60, "value": {"points": square, "polygonlabels": ["Object"], "closed": True}}
    draft = {"id": 11, "model_version": "sam-x", "result": [brush]}
    task = {"id": 5, "data": {"image": "/x.png"}, "predictions": [draft], "annotations": [
        {"id": 1, "result": [brush, poly], "was_cancelled": False, "updated_at": "2026-01-02", "parent_prediction": 11},
        {"id": 2, "result": [brush], "was_cancelled": True, "updated_at": "2026-01-03"},
    ]}
    objects = task_objects(task, config)
    assert len(objects) == 2  # the cancelled newer annotation is ignored
    input_gt = rle_to_mask(mask_to_rle(gt), 60, 80)
    import cv2

    scaled = cv2.resize(input_gt.astype(np.uint8), objects[0].mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert iou(objects[0].mask, scaled) > 0.95
    h, w = objects[1].mask.shape
    ys, xs = np.nonzero(objects[1].mask)
    assert abs(xs.min() - 0.1 * w) <= 2 and abs(xs.max() - 0.3 * w) <= 2 and abs(ys.max() - 0.4 * h) <= 2
    changes = draft_changes([task])
    assert list(changes) == ["sam-x"] and 0.3 < changes["sam-x"][0] < 0.95  # the annotator added a polygon


def synthetic_tasks(image_server, count: int, first_id: int = 1) -> list[dict]:
    """Label Studio-shaped tasks whose images are served over HTTP and whose annotations are brush masks."""
    tasks = []
    for task_id in range(first_id, first_id + count):
        scene = make_scene(task_id)
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(scene.image).save(buffer, format="PNG")
        url = image_server.add(f"/data/upload/1/scene-{task_id}.png", buffer.getvalue())
        task = annotated_task(task_id, scene.gt)
        task["data"]["image"] = url
        tasks.append(task)
    return tasks


def test_training_on_annotations_with_sam_writes_a_gated_checkpoint(settings, make_client, image_server):
    """The production path on the small random SAM: images over HTTP, embeddings through the cache,
    a candidate trained, evaluated against plain SAM, and stored with its metrics either way."""
    settings = settings.replace(train_steps=15, train_min_corrections=4, train_margin=0.0)
    _, services = make_client(settings)
    tasks = synthetic_tasks(image_server, 14)
    assert sum(held_out(t["id"]) for t in tasks) >= 2
    gone = annotated_task(99, make_scene(99).gt)  # its image was deleted from storage: skipped, not fatal
    gone["data"]["image"] = image_server.url + "/data/upload/1/deleted.png"
    summary = train_on_tasks(services, 4, tasks + [gone], parse_label_config(CONFIG))
    assert summary["tasks"] == 15 and summary["corrections"] == 14
    assert summary["status"] in ("promoted", "rejected"), summary
    registry = HeadRegistry(settings.head_registry_dir)
    [version] = registry.versions(4)
    meta = version.meta
    assert meta["base_model_id"] == services.loader.model_id
    assert set(meta["metrics"]) == {"base", "served", "candidate"}
    assert meta["corrections"]["train"] + meta["corrections"]["heldout"] == 14
    assert meta["status"] == summary["status"]
    assert (registry.current(4) == version.version) == (meta["status"] == "promoted")
    registry.load(4, version.version, services.loader.model_id)  # loads and passes every check
    # too few corrections: nothing is trained, and the reason says what is missing
    few = train_on_tasks(services, 5, tasks[:3], parse_label_config(CONFIG))
    assert few["status"] == "skipped" and "not enough corrections" in few["reason"]
    assert registry.versions(5) == []


# ---------------------------------------------------------------- serving: live reload, refusals, rollback

def click_body(project: str) -> dict:
    body = copy.deepcopy(protocol_body("predict_interactive_keypointlabels.json"))
    body["project"] = project
    return body


def brush_area(response) -> int:
    brush = next(r for r in response.json["results"][0]["result"] if r["type"] == "brushlabels")
    return int(rle_to_mask(brush["value"]["rle"], brush["original_height"], brush["original_width"]).sum())


def test_serving_worker_switches_head_live_and_refuses_a_corrupt_one(settings, make_client, image_server, capsys):
    image_server.add("/data/local-files/?d=local/img_local.png", make_image(80, 60))
    settings = settings.replace(head_reload_seconds=0.0)
    c, services = make_client(settings)
    plain = c.post("/predict", json=click_body("7.1700000000"))
    assert plain.status_code == 200, plain.json
    assert plain.json["results"][0]["model_version"] == services.loader.model_version

    registry = HeadRegistry(settings.head_registry_dir)
    grow = RefineHead()
    with torch.no_grad():
        grow.out.bias.fill_(40.0)  # a head that marks its whole crop as object: impossible to miss
    v1 = registry.save(7, grow, {"base_model_id": services.loader.model_id, "status": "promoted"})
    registry.set_current(7, v1.version, "test")
    refined = c.post("/predict", json=click_body("7.1700000000"))
    assert refined.json["results"][0]["model_version"] == f"{services.loader.model_version}+head-p7-v0001"
    assert brush_area(refined) > brush_area(plain)
    assert "head;dur=" in refined.headers["Server-Timing"]
    # the image the head looks at was evicted from Redis (or cached before images were kept): downloaded again
    import redis as redis_lib

    redis_lib.Redis.from_url(settings.redis_url).delete(*redis_lib.Redis.from_url(settings.redis_url).keys("sam-backend:img:*"))
    services.embedder._images.clear()
    downloads = len(image_server.requests)
    again = c.post("/predict", json=click_body("7.1700000000"))
    assert again.status_code == 200 and brush_area(again) == brush_area(refined)
    assert len(image_server.requests) == downloads + 1
    other = c.post("/predict", json=click_body("8.1700000000"))  # heads are per project
    assert other.json["results"][0]["model_version"] == services.loader.model_version
    assert c.post("/setup", json={**protocol_body("setup.json"), "project": "7.1700000000"}).json["model_version"] \
        .endswith("+head-p7-v0001")

    # a corrupt v0002 is pointed at behind the registry's back: refused, v0001 keeps serving
    v2 = registry.save(7, RefineHead(), {"base_model_id": services.loader.model_id, "status": "promoted"})
    (registry.project_dir(7) / v2.version / "head.pt").write_bytes(b"not a checkpoint")
    (registry.project_dir(7) / "current").write_text(v2.version)
    after = c.post("/predict", json=click_body("7.1700000000"))
    assert after.status_code == 200
    assert after.json["results"][0]["model_version"].endswith("+head-p7-v0001")
    assert metric(c, "sam_head_load_errors_total") == 1
    # an incompatible head (trained on another SAM) is refused the same way
    v3 = registry.save(7, RefineHead(), {"base_model_id": "vit_h-000000000000", "status": "promoted"})
    (registry.project_dir(7) / "current").write_text(v3.version)
    assert c.post("/predict", json=click_body("7.1700000000")).json["results"][0]["model_version"].endswith("-v0001")

    # rollback in one command, and `heads` lists every version with the served one marked
    assert heads_command(settings, 7, None, off=True) == 0
    assert c.post("/predict", json=click_body("7.1700000000")).json["results"][0]["model_version"] \
        == services.loader.model_version
    assert heads_command(settings, 7, "v0002", off=False) == 2  # corrupt: refused
    assert heads_command(settings, 7, "v0001", off=False) == 0
    assert c.post("/predict", json=click_body("7.1700000000")).json["results"][0]["model_version"].endswith("-v0001")
    capsys.readouterr()
    assert heads_command(settings, 7, None, off=False) == 0
    listing = capsys.readouterr().out
    assert "* v0001" in listing and "v0002" in listing and "v0003" in listing


# ---------------------------------------------------------------- webhooks and the train queue

def test_annotation_webhooks_queue_one_debounced_training_run(settings, make_client, redis_url):
    import redis as redis_lib

    settings = settings.replace(train_after_annotations=3)
    c, _ = make_client(settings)
    connection = redis_lib.Redis.from_url(redis_url)
    connection.delete(jobs.train_job_id(1), "sam-backend:train:new:1")
    jobs.queue(connection, jobs.TRAIN_QUEUE).empty()
    body = protocol_body("webhook_annotation_created.json")
    states = [c.post("/webhook", json=body).json.get("training") for _ in range(5)]
    assert states == [None, None, "queued", "waiting", "waiting"]
    assert jobs.queue(connection, jobs.TRAIN_QUEUE).count == 1
    start = c.post("/webhook", json=protocol_body("webhook_start_training.json"))
    assert start.status_code == 200 and start.json["training"] == "waiting"  # already queued: still one job
    assert jobs.queue(connection, jobs.TRAIN_QUEUE).count == 1
    assert metric(c, "sam_train_jobs_total") == 1


def test_acceptance_figures_reach_metrics(settings, make_client, redis_url):
    import redis as redis_lib

    from backend.jobs.training import record_acceptance

    c, _ = make_client(settings)
    record_acceptance(redis_lib.Redis.from_url(redis_url), 9, {"sam-v": {"corrections": 4, "mean_iou": 0.8,
                                                                         "unchanged": 0.25}})
    assert {"project": "9", "model_version": "sam-v", "corrections": 4, "mean_iou": 0.8, "unchanged": 0.25} in \
        acceptance_rows(redis_lib.Redis.from_url(redis_url))
    text = c.get("/metrics").data.decode()
    assert 'sam_draft_iou{model_version="sam-v",project="9"} 0.8' in text


def test_every_accepts_durations():
    assert parse_every("90") == 90 and parse_every("30m") == 1800 and parse_every("6h") == 21600
    with pytest.raises(ValueError):
        parse_every("soon")


def test_bench_learn_prints_a_table_and_a_json_last_line():
    """The benchmark runs end to end on a tiny budget; its figures are not judged here."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "backend.commands.cli", "bench", "learn", "--rounds", "3,6", "--heldout", "3",
                             "--steps", "4"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert [r["corrections"] for r in figures["rounds"]] == [3, 6]
    assert figures["heldout_objects"] == 3 and "noc90" in figures["base"]
    assert result.returncode == (0 if figures["never_promoted_regression"] else 1)
    assert any("served mIoU" in line for line in lines)


def test_train_command_says_what_is_missing(settings, capsys):
    from backend.commands.train import train

    assert train(settings.replace(label_studio_url=None), 1, inline=True, wait=True, every=None) == 2
    assert "LABEL_STUDIO_URL" in capsys.readouterr().out
    assert train(settings.replace(redis_url=None), 1, inline=False, wait=True, every=None) == 2
    assert "--inline" in capsys.readouterr().out
    assert train(settings, 1, inline=True, wait=True, every="soon") == 2
    assert "duration" in capsys.readouterr().out
