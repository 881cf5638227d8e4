"""The labeling page, as an annotator uses it: headless Chromium (Debian's) driven by Playwright for
Python logs into a real Label Studio 1.23.2 with this backend connected, turns on Auto-Annotation,
clicks with the smart keypoint (positive, then Alt-click negative) and drags the smart rectangle on
every config of label_config/, accepts the suggestions, submits, and reads the annotation back
through the API; a click on a 20 MP photo likewise; "Retrieve Predictions" from the Data Manager, then
the task opens with its draft.

The model is the tests' small SAM with random weights (no real weights can exist here): its masks
are ragged and have nothing to do with the picture, so "where the click was" is checked as what the
page sent (the prompt at the clicked spot) and what it kept (exactly the mask the backend answered
for that prompt, at the image's full size).

Printed at the end of the run: for each measured answer, the bytes Label Studio sent the page, its
regions and polygon vertices, the time from the answer's last byte to the first frame painted with
its regions, and the page's main-thread CPU time from the click to that frame (figures, not
assertions: they depend on the machine's load). What is asserted is the answer's shape, which is
deterministic: no mask becomes more polygon regions than POLYGON_MAX_PARTS nor more vertices than
POLYGON_MAX_VERTICES (the page spends its time per region: tests/e2e/probe_page_cost.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from backend.bench.click import synthetic_jpeg
from backend.labelstudio.rle import rle_to_mask
from backend.settings import Settings
from tests.conftest import make_image
from tests.e2e.browser import Editor, chromium_missing, labels_controls, launch, login, wait_until
from tests.e2e.conftest import PAGE_FIGURES, ROOT, TIMINGS, BackendServer
from tests.e2e.test_label_studio import create_project, local_storage

# the bitmask config is left out: this test reads the page's answers as brush RLE or polygons, and its
# BitmaskLabels path (a PNG per region) is proven through the API in test_label_studio.py instead
CONFIGS = sorted(p for p in (ROOT / "label_config").glob("*.xml") if "<BitmaskLabels" not in p.read_text())
# where the page clicks and drags, as fractions of the displayed image, on a config with a brush output
POSITIVE, NEGATIVE, BOX = (0.4, 0.45), (0.8, 0.8), ((0.25, 0.25), (0.55, 0.65))
MIN_AREA = 2000  # POLYGON_MIN_AREA of the page's backend
SIDE = 1000  # 1 MP
BIG = (5472, 3648)  # 20 MP
EMAIL, PASSWORD = "admin@example.com", "e2e-admin-pass"  # the e2e Label Studio's admin (conftest)


@pytest.fixture(scope="module")
def page_backend(label_studio, tiny_checkpoint, e2e_redis, tmp_path_factory):
    """Parts under 2000 px are dropped (POLYGON_MIN_AREA): the random test SAM's ragged masks would
    otherwise become hundreds of polygon regions per click (the e2e backend keeps every part), which
    take this page minutes to draw."""
    server = BackendServer(tmp_path_factory.mktemp("page-backend"), tiny_checkpoint, e2e_redis.url,
                           label_studio.url, label_studio.token, env={"POLYGON_MIN_AREA": str(MIN_AREA)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = chromium_missing()
    assert missing is None, missing
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"))
    yield context
    context.close()  # ends the Chromium it started
    playwright.stop()


@pytest.fixture
def page(browser, label_studio, request, tmp_path_factory):
    """A logged-in tab; when the test fails, a screenshot of it (path printed) and its console errors."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    login(tab, label_studio.url, EMAIL, PASSWORD)
    yield tab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        folder = tmp_path_factory.mktemp("screenshots")
        shot = folder / f"{request.node.name.replace('/', '_')}.png"
        try:
            tab.screenshot(path=str(shot), timeout=30_000)
        except Exception as exc:  # a hung page cannot be photographed: say so instead of hiding the failure
            print(f"no screenshot ({exc.__class__.__name__})")
        (folder / "console.txt").write_text("\n".join(errors))
        print(f"browser screenshot and console errors of {request.node.name}: {folder}")
    tab.close()


def connect(ls, backend: BackendServer, project_id: int) -> int:
    """`sam-backend connect`; Label Studio's 3 s /setup check can time out on a loaded machine: retried."""
    for _ in range(3):
        result = backend.cli("connect", "--project", str(project_id), "--url", backend.url)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stdout + result.stderr
    [ml] = ls.api("GET", "/api/ml", params={"project": project_id}).json()
    assert ml["is_interactive"]
    return ml["id"]


def upload(ls, project_id: int, name: str, data: bytes, mime: str) -> dict:
    response = ls.api("POST", f"/api/projects/{project_id}/import", files={"file": (name, data, mime)})
    assert response.status_code == 201, response.text
    tasks = ls.api("GET", "/api/tasks", params={"project": project_id}).json()["tasks"]
    return max(tasks, key=lambda t: t["id"])


def smart_controls(config_xml: str) -> dict[str, tuple[str, str]]:
    """tag -> (control name, its first label) for the smart tags."""
    return {tag: (name, labels[0]) for tag, name, labels in labels_controls(config_xml)
            if tag in ("KeyPointLabels", "RectangleLabels")}


def regions_of(answer_regions: list[dict]) -> dict[str, list[dict]]:
    by_type: dict[str, list[dict]] = {}
    for region in answer_regions:
        by_type.setdefault(region["type"], []).append(region)
    return by_type


def check_kept(submitted: list[dict], answered: list[dict], label: str, size: tuple[int, int]) -> None:
    """The submitted regions are the backend's answer, unchanged, with the smart tool's label, at the
    image's full size; brush masks are non-empty."""
    width, height = size
    assert submitted, "nothing was submitted"
    kept = regions_of(submitted)
    sent = regions_of(answered)
    assert set(kept) == set(sent), (set(kept), set(sent))
    for region in submitted:
        assert (region["original_width"], region["original_height"]) == (width, height)
        assert region["value"][region["type"]] == [label]
    for kept_brush, sent_brush in zip(kept.get("brushlabels", []), sent.get("brushlabels", [])):
        mask = rle_to_mask(kept_brush["value"]["rle"], height, width)
        assert mask.shape == (height, width) and mask.any()
        assert np.array_equal(mask, rle_to_mask(sent_brush["value"]["rle"], height, width))
    kept_polygons = sorted(np.round(np.array(r["value"]["points"]), 2).tolist() for r in kept.get("polygonlabels", []))
    sent_polygons = sorted(np.round(np.array(r["value"]["points"]), 2).tolist() for r in sent.get("polygonlabels", []))
    assert kept_polygons == sent_polygons


def prompt(kind: str, name: str, label: str, size: tuple[int, int], value: dict, positive: bool = True) -> dict:
    """A smart region as the page sends it in the context (percent coordinates)."""
    region = {"id": f"probe-{kind}", "from_name": name, "to_name": "image", "type": f"{kind}labels",
              "original_width": size[0], "original_height": size[1], "image_rotation": 0, "origin": "manual",
              "value": {**value, f"{kind}labels": [label]}}
    if kind == "keypoint":
        region["is_positive"] = positive
        region["value"]["width"] = 0.5
    return region


def largest_polygon_px(ls, ml_id: int, task_id: int, regions: list[dict], size: tuple[int, int]) -> float:
    """Through the same Label Studio call the page makes: the area in pixels of the answer's largest
    polygon (0 for none)."""
    answer = ls.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                    json={"task": task_id, "context": {"result": regions}})
    assert answer.status_code == 200, answer.text
    assert not answer.json().get("errors"), answer.json()
    best = 0.0
    for region in answer.json()["data"]["result"]:
        points = np.array(region["value"]["points"]) * np.array(size) / 100.0
        x, y = points[:, 0], points[:, 1]
        best = max(best, 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))))
    return best


def polygon_prompts(ls, ml_id: int, task_id: int, config_xml: str, size: tuple[int, int]):
    """Where to click and drag on a polygon-only config: the random test SAM's ragged masks often have
    no part above POLYGON_MIN_AREA (an empty answer: nothing to accept). Asked before the page clicks,
    through Label Studio's own interactive call: the first positive point, then negative point, then
    box whose answer has a polygon of twice the minimum area, so that the page's click (a fraction of
    a pixel away) gets a non-empty answer too. The page's answers are then checked as for the brush."""
    smart = smart_controls(config_xml)
    kp_name, kp_label = smart["KeyPointLabels"]
    box_name, box_label = smart["RectangleLabels"]
    grid = [(0.2 + 0.15 * i, 0.2 + 0.15 * j) for j in range(5) for i in range(5)]

    def point(f, positive=True):
        return prompt("keypoint", kp_name, kp_label, size, {"x": f[0] * 100, "y": f[1] * 100}, positive)

    def enough(regions):
        return largest_polygon_px(ls, ml_id, task_id, regions, size) >= 2 * MIN_AREA

    positive = next((f for f in grid if enough([point(f)])), None)
    assert positive is not None, "no click on the grid gives a polygon answer"
    negative = next((f for f in grid if f != positive and enough([point(positive), point(f, False)])), None)
    assert negative is not None, f"no Alt-click after {positive} gives a polygon answer"
    boxes = [((x, y), (x + w, y + h)) for x, y in [(0.25, 0.25), (0.1, 0.1), (0.4, 0.3), (0.2, 0.5)]
             for w, h in [(0.3, 0.4), (0.5, 0.4)]]
    box = next((b for b in boxes if enough([prompt("rectangle", box_name, box_label, size, {
        "x": b[0][0] * 100, "y": b[0][1] * 100, "width": (b[1][0] - b[0][0]) * 100,
        "height": (b[1][1] - b[0][1]) * 100, "rotation": 0})])), None)
    assert box is not None, "no box gives a polygon answer"
    return positive, negative, box


def figure(what: str, answer) -> None:
    """Records the answer's figures, and checks its shape against what the page is known to draw in
    time (deterministic, unlike the time itself, which is printed): the page spends its time per
    polygon region, so no mask becomes more than POLYGON_MAX_PARTS of them (issue 13)."""
    bounds = Settings()  # the page's backend runs with the default bounds
    regions = answer.body["data"]["result"]
    polygons = [r for r in regions if r["type"] == "polygonlabels"]
    vertices = sum(len(r["value"]["points"]) for r in polygons)
    assert len(polygons) <= bounds.polygon_max_parts, len(polygons)
    assert vertices <= bounds.polygon_max_vertices, vertices
    shown = "n/a" if answer.answer_to_visible_ms is None else f"{answer.answer_to_visible_ms / 1000:.2f} s"
    cpu = "n/a" if answer.page_cpu_ms is None else f"{answer.page_cpu_ms / 1000:.2f} s"
    PAGE_FIGURES.append(f"page: {what}: {answer.payload_bytes / 1e6:.3f} MB to the page, {len(regions)} regions"
                        f" ({len(polygons)} polygons, {vertices} vertices), answer to visible {shown},"
                        f" page main-thread CPU click to visible {cpu}")


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_smart_tools_in_the_labeling_page(label_studio, page_backend, page, config_path):
    started = time.monotonic()
    config_xml = config_path.read_text()
    project = create_project(label_studio, config_path)
    task = upload(label_studio, project["id"], "photo.png", make_image(SIDE, SIDE, seed=project["id"]), "image/png")
    ml_id = connect(label_studio, page_backend, project["id"])
    smart = smart_controls(config_xml)
    kp_name, kp_label = smart["KeyPointLabels"]
    box_name, box_label = smart["RectangleLabels"]
    if "<BrushLabels" in config_xml:
        at, away, (corner, far) = POSITIVE, NEGATIVE, BOX
    else:  # polygon only: prompts whose answer is not empty (this also encodes the image first)
        at, away, (corner, far) = polygon_prompts(label_studio, ml_id, task["id"], config_xml, (SIDE, SIDE))

    editor = Editor(page, label_studio.url, config_xml)
    editor.open(project["id"], task["id"])
    editor.auto_annotation(True)

    # smart keypoint: a positive click, the label again, an Alt-click: one prompt of both points
    editor.smart_tool("key-point-tool")
    editor.select_label(kp_name, kp_label)
    positive = editor.click(*at)
    [point] = positive.context["result"]
    assert point["type"] == "keypointlabels" and point["is_positive"] is True
    assert point["value"]["keypointlabels"] == [kp_label]
    # where the click was
    assert abs(point["value"]["x"] - 100 * at[0]) < 0.5 and abs(point["value"]["y"] - 100 * at[1]) < 0.5
    assert not positive.body.get("errors"), positive.body
    assert editor.suggestions() == len(positive.body["data"]["result"]) > 0
    figure(f"{config_path.stem} 1 MP keypoint", positive)
    # Label Studio drops the label after a smart region: the next click would send nothing
    assert not editor.label_selected(kp_name)
    editor.select_label(kp_name, kp_label)
    negative = editor.click(*away, negative=True)
    assert [p["is_positive"] for p in negative.context["result"]] == [True, False]
    assert abs(negative.context["result"][1]["value"]["x"] - 100 * away[0]) < 0.5
    assert abs(negative.context["result"][1]["value"]["y"] - 100 * away[1]) < 0.5
    assert not negative.body.get("errors"), negative.body
    assert editor.suggestions() == len(negative.body["data"]["result"]) > 0
    figure(f"{config_path.stem} 1 MP keypoint + Alt-click", negative)
    editor.accept()

    # smart rectangle: a box dragged over the disc
    editor.smart_tool("rectangle-tool")
    editor.select_label(box_name, box_label)
    boxed = editor.drag(corner, far)
    [box] = boxed.context["result"]
    assert box["type"] == "rectanglelabels" and box["value"]["rectanglelabels"] == [box_label]
    assert abs(box["value"]["x"] - 100 * corner[0]) < 0.5 and abs(box["value"]["width"] - 100 * (far[0] - corner[0])) < 1
    assert abs(box["value"]["y"] - 100 * corner[1]) < 0.5 and abs(box["value"]["height"] - 100 * (far[1] - corner[1])) < 1
    assert not boxed.body.get("errors"), boxed.body
    assert editor.suggestions() == len(boxed.body["data"]["result"]) > 0
    figure(f"{config_path.stem} 1 MP box", boxed)
    editor.accept()

    submitted = editor.submit()
    stored = label_studio.api("GET", f"/api/annotations/{submitted['id']}").json()["result"]
    # the smart prompts (keypoint, box) are gone: what stays is the two accepted answers
    assert {r["type"] for r in stored} <= {"brushlabels", "polygonlabels"}
    ids = {r["id"] for r in stored}
    first = [r for r in stored if r["id"] in {a["id"] for a in negative.body["data"]["result"]}]
    second = [r for r in stored if r["id"] in {a["id"] for a in boxed.body["data"]["result"]}]
    assert len(first) + len(second) == len(ids)
    check_kept(first, negative.body["data"]["result"], kp_label, (SIDE, SIDE))
    check_kept(second, boxed.body["data"]["result"], box_label, (SIDE, SIDE))
    TIMINGS[f"page {config_path.stem}"] = time.monotonic() - started


@pytest.mark.parametrize("config_name", ["surface_defects_brush"])
def test_a_20_mp_photo_in_the_labeling_page(label_studio, page_backend, page, config_name):
    """A keypoint click on 5472x3648: the answer is drawn, accepted, submitted and read back at full size."""
    config_path = ROOT / "label_config" / f"{config_name}.xml"
    config_xml = config_path.read_text()
    project = create_project(label_studio, config_path)
    task = upload(label_studio, project["id"], "screen.jpg", synthetic_jpeg(BIG, seed=11), "image/jpeg")
    connect(label_studio, page_backend, project["id"])
    kp_name, kp_label = smart_controls(config_xml)["KeyPointLabels"]
    editor = Editor(page, label_studio.url, config_xml)
    editor.open(project["id"], task["id"])
    editor.auto_annotation(True)
    editor.smart_tool("key-point-tool")
    editor.select_label(kp_name, kp_label)
    answer = editor.click(0.5, 0.5)
    assert not answer.body.get("errors"), answer.body
    assert editor.suggestions() == len(answer.body["data"]["result"]) > 0
    figure(f"{config_name} 20 MP keypoint", answer)
    editor.accept()
    submitted = editor.submit()
    stored = label_studio.api("GET", f"/api/annotations/{submitted['id']}").json()["result"]
    check_kept(stored, answer.body["data"]["result"], kp_label, BIG)



def test_retrieve_predictions_from_the_data_manager_then_open_the_draft(label_studio, page_backend, page):
    """Tasks imported with a detector's box, as the README's order has it (import, then connect
    --show-our-drafts); in the Data Manager: select all, Actions -> "Retrieve Predictions", OK. The
    backend queues a pre-label job, its worker posts a box-prompted SAM draft; then the task opens
    with the draft's regions in the editor, ready to submit."""
    config_path = ROOT / "label_config" / "surface_defects_brush.xml"
    project = create_project(label_studio, config_path)
    pid = project["id"]
    folder = label_studio.files_root / f"p{pid}"
    folder.mkdir()
    (folder / "screen.png").write_bytes(make_image(SIDE, SIDE, seed=77))
    box = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": SIDE,
           "original_height": SIDE, "image_rotation": 0,
           "value": {"x": 25.0, "y": 25.0, "width": 30.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["Pit"]}}
    local_storage(label_studio, pid, folder, sync=False)
    imported = label_studio.api("POST", f"/api/projects/{pid}/import", json=[{
        "data": {"image": f"/data/local-files/?d=p{pid}/screen.png"},
        "predictions": [{"model_version": "detector-v1", "result": [box]}]}])
    assert imported.status_code == 201, imported.text
    [task] = label_studio.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"]
    connect(label_studio, page_backend, pid)
    shown = page_backend.cli("connect", "--project", str(pid), "--url", page_backend.url, "--show-our-drafts")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    model_version = label_studio.api("GET", "/api/ml", params={"project": pid}).json()[0]["model_version"]

    def ours() -> list[dict]:
        return [p for p in label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
                if p["model_version"] == model_version]

    assert ours() == []
    page.goto(f"{label_studio.url}/projects/{pid}/data")
    page.locator("[aria-label='Select all rows']").click()
    actions = page.locator("button[aria-label='Tasks Actions']")
    page.wait_for_function("() => document.querySelector(\"button[aria-label='Tasks Actions']\")"
                           ".textContent.includes('1 Task')", timeout=30_000)
    actions.click()
    page.locator("[aria-label='Retrieve Predictions']").click()
    # Label Studio's confirmation dialog, then its call of the action
    with page.expect_response(lambda r: "/api/dm/actions" in r.url and r.request.method == "POST",
                              timeout=180_000) as acted:
        # its OK button is not in the page's accessibility tree (no role "button" found): by its text
        page.get_by_text("OK", exact=True).last.click()
    assert acted.value.status == 200, acted.value.text()
    assert "retrieve_tasks_predictions" in acted.value.url

    [draft] = wait_until(ours, 180, "a draft from Retrieve Predictions")
    [region] = draft["result"]  # one SAM mask for the detector's one box, with the box's label
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Pit"]
    assert rle_to_mask(region["value"]["rle"], SIDE, SIDE).any()

    # the task opens with the draft's region in the outliner; submitted as it is, it reads back unchanged
    editor = Editor(page, label_studio.url, config_path.read_text())
    editor.open(pid, task["id"])
    page.locator(".lsf-outliner-item").first.wait_for(timeout=60_000)
    assert editor.regions_listed() == 1
    submitted = editor.submit()
    stored = label_studio.api("GET", f"/api/annotations/{submitted['id']}").json()["result"]
    assert [r["type"] for r in stored] == ["brushlabels"] and stored[0]["value"]["brushlabels"] == ["Pit"]
    assert np.array_equal(rle_to_mask(stored[0]["value"]["rle"], SIDE, SIDE),
                          rle_to_mask(region["value"]["rle"], SIDE, SIDE))
