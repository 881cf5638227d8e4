"""The labeling page, as an annotator uses it: headless Chromium (Debian's) driven by Playwright for
Python logs into a real Label Studio 1.23.2 with this backend connected, turns on Auto-Annotation,
clicks with the smart keypoint (positive, then Alt-click negative) and drags the smart rectangle on
the configs of label_config/ with a brush output, accepts the suggestions, submits, and reads the annotation back
through the API; a click on a 20 MP photo likewise.

The model is the tests' small SAM with random weights (no real weights can exist here): its masks
are ragged and have nothing to do with the picture, so "where the click was" is checked as what the
page sent (the prompt at the clicked spot) and what it kept (exactly the mask the backend answered
for that prompt, at the image's full size).

Printed at the end of the run: for each measured answer, the bytes Label Studio sent the page and
the time from the answer's last byte to the first frame painted with its regions (figures, not
assertions: they depend on the machine's load)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from backend.bench.click import synthetic_jpeg
from backend.labelstudio.rle import rle_to_mask
from tests.conftest import make_image
from tests.e2e.browser import Editor, chromium_missing, labels_controls, launch, login
from tests.e2e.conftest import PAGE_FIGURES, ROOT, TIMINGS, BackendServer
from tests.e2e.test_label_studio import create_project

# configs with a brush output: the random test SAM's ragged masks, after an Alt-click, can have no part
# above POLYGON_MIN_AREA, so a polygon-only config may get an empty answer (seen with
# single_object_polygon); the polygon answers of brush_and_polygon are checked here all the same
CONFIGS = [p for p in sorted((ROOT / "label_config").glob("*.xml")) if "<BrushLabels" in p.read_text()]
SIDE = 1000  # 1 MP
BIG = (5472, 3648)  # 20 MP
EMAIL, PASSWORD = "admin@example.com", "e2e-admin-pass"  # the e2e Label Studio's admin (conftest)


@pytest.fixture(scope="module")
def page_backend(label_studio, tiny_checkpoint, e2e_redis, tmp_path_factory):
    """Parts under 2000 px are dropped (POLYGON_MIN_AREA): the random test SAM's ragged masks would
    otherwise become hundreds of polygon regions per click (the e2e backend keeps every part), which
    take this page minutes to draw."""
    server = BackendServer(tmp_path_factory.mktemp("page-backend"), tiny_checkpoint, e2e_redis.url,
                           label_studio.url, label_studio.token, env={"POLYGON_MIN_AREA": "2000"})
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


def figure(what: str, answer) -> None:
    shown = "n/a" if answer.answer_to_visible_ms is None else f"{answer.answer_to_visible_ms / 1000:.2f} s"
    PAGE_FIGURES.append(f"page: {what}: {answer.payload_bytes / 1e6:.2f} MB to the page, "
                        f"{len(answer.body['data']['result'])} regions, answer to visible {shown}")


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_smart_tools_in_the_labeling_page(label_studio, page_backend, page, config_path):
    started = time.monotonic()
    config_xml = config_path.read_text()
    project = create_project(label_studio, config_path)
    task = upload(label_studio, project["id"], "photo.png", make_image(SIDE, SIDE, seed=project["id"]), "image/png")
    connect(label_studio, page_backend, project["id"])
    smart = smart_controls(config_xml)
    kp_name, kp_label = smart["KeyPointLabels"]
    box_name, box_label = smart["RectangleLabels"]

    editor = Editor(page, label_studio.url, config_xml)
    editor.open(project["id"], task["id"])
    editor.auto_annotation(True)

    # smart keypoint: a positive click, the label again, an Alt-click: one prompt of both points
    editor.smart_tool("key-point-tool")
    editor.select_label(kp_name, kp_label)
    positive = editor.click(0.4, 0.45)
    [point] = positive.context["result"]
    assert point["type"] == "keypointlabels" and point["is_positive"] is True
    assert point["value"]["keypointlabels"] == [kp_label]
    assert abs(point["value"]["x"] - 40) < 0.5 and abs(point["value"]["y"] - 45) < 0.5  # where the click was
    assert not positive.body.get("errors"), positive.body
    assert editor.suggestions() == len(positive.body["data"]["result"]) > 0
    figure(f"{config_path.stem} 1 MP keypoint", positive)
    # Label Studio drops the label after a smart region: the next click would send nothing
    assert not editor.label_selected(kp_name)
    editor.select_label(kp_name, kp_label)
    negative = editor.click(0.8, 0.8, negative=True)
    assert [p["is_positive"] for p in negative.context["result"]] == [True, False]
    assert abs(negative.context["result"][1]["value"]["x"] - 80) < 0.5
    assert editor.suggestions() == len(negative.body["data"]["result"]) > 0
    editor.accept()

    # smart rectangle: a box dragged over the disc
    editor.smart_tool("rectangle-tool")
    editor.select_label(box_name, box_label)
    boxed = editor.drag((0.25, 0.25), (0.55, 0.65))
    [box] = boxed.context["result"]
    assert box["type"] == "rectanglelabels" and box["value"]["rectanglelabels"] == [box_label]
    assert abs(box["value"]["x"] - 25) < 0.5 and abs(box["value"]["width"] - 30) < 1
    assert abs(box["value"]["y"] - 25) < 0.5 and abs(box["value"]["height"] - 40) < 1
    assert editor.suggestions() == len(boxed.body["data"]["result"]) > 0
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

