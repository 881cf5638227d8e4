"""Where the labeling page's time goes after an answer (issue 13). Not collected by default (not
test_*.py): run it by path, `pytest -q -s tests/e2e/probe_page_cost.py`.

The page (real Label Studio 1.23.2 in Debian's headless Chromium) gets answers shaped on purpose:
Playwright fulfils its interactive-annotating request with polygon answers of N regions x V vertices
(per region or per vertex?), and 20 MP brush answers of different content (the backend's own ragged
answer, a ragged mask and a smooth disc: bytes or pixels?). An init script times the browser calls
the editor makes on the way (Response.json, JSON.parse, canvas ImageData calls, toDataURL, mask image
decode, drawImage) and the long tasks; printed per answer, relative to the response's end."""

from __future__ import annotations

import json
import uuid

import cv2
import numpy as np
import pytest

from backend.bench.click import synthetic_jpeg
from backend.labelstudio.rle import mask_to_rle
from tests.conftest import make_image
from tests.e2e.browser import Editor
from tests.e2e.conftest import ROOT
from tests.e2e.test_browser import BIG, SIDE, connect, upload
from tests.e2e.test_browser import browser, page, page_backend  # noqa: F401
from tests.e2e.test_label_studio import create_project

PROBE = """
(() => {
  const log = window.__probe = [];
  const now = () => performance.now();
  const wrap = (proto, name, keep) => {
    const orig = proto[name];
    proto[name] = function (...args) {
      const t0 = now();
      const out = orig.apply(this, args);
      const dt = now() - t0;
      const info = keep(this, args, out, dt);
      if (info) log.push({name, t0, dt, ...info});
      return out;
    };
  };
  const big = (w, h) => w * h >= 1e6;
  wrap(CanvasRenderingContext2D.prototype, 'createImageData', (c, a) => big(a[0], a[1]) && {w: a[0], h: a[1]});
  wrap(CanvasRenderingContext2D.prototype, 'getImageData', (c, a) => big(a[2], a[3]) && {w: a[2], h: a[3]});
  wrap(CanvasRenderingContext2D.prototype, 'putImageData', (c, a) => big(a[0].width, a[0].height) && {w: a[0].width, h: a[0].height});
  wrap(CanvasRenderingContext2D.prototype, 'drawImage', (c, a, o, dt) => {
    const s = a[0]; const w = s.naturalWidth || s.width, h = s.naturalHeight || s.height;
    return big(w, h) && !(s instanceof HTMLImageElement && s.alt === 'image') && {w, h};
  });
  wrap(HTMLCanvasElement.prototype, 'toDataURL', (c, a, out) => big(c.width, c.height) && {w: c.width, h: c.height, bytes: out.length});
  wrap(JSON, 'parse', (t, a, o, dt) => a[0] && a[0].length > 50000 && {bytes: a[0].length});
  const json = Response.prototype.json;
  Response.prototype.json = async function () {
    const t0 = now();
    const out = await json.call(this);
    if (this.url.includes('interactive-annotating')) log.push({name: 'Response.json', t0, dt: now() - t0});
    return out;
  };
  const src = Object.getOwnPropertyDescriptor(HTMLImageElement.prototype, 'src');
  Object.defineProperty(HTMLImageElement.prototype, 'src', {
    get() { return src.get.call(this); },
    set(v) {
      if (typeof v === 'string' && v.startsWith('data:') && v.length > 20000) {
        const t0 = now();
        this.addEventListener('load', () => log.push({name: 'mask image load', t0, dt: now() - t0, bytes: v.length}), {once: true});
      }
      src.set.call(this, v);
    },
  });
  try {
    new PerformanceObserver(l => l.getEntries().forEach(e => log.push({name: 'longtask', t0: e.startTime, dt: e.duration})))
      .observe({type: 'longtask', buffered: true});
  } catch (e) {}
})();
"""


@pytest.fixture
def probed(page):
    page.add_init_script(PROBE)
    return page


def breakdown(page, answer, what: str, extra: str = "") -> str:
    """One line: the answer-to-visible time and each timed call after the response's end."""
    end = page.evaluate("() => { const e = performance.getEntriesByType('resource')"
                        ".filter(e => e.name.includes('interactive-annotating')); return e[e.length - 1].responseEnd; }")
    events = [e for e in page.evaluate("window.__probe") if e["t0"] + e["dt"] >= end - 1]
    page.evaluate("window.__probe.length = 0")
    calls: dict[str, list[float]] = {}
    for e in events:
        if e["name"] != "longtask":
            calls.setdefault(e["name"], []).append(e["dt"])
    longtasks = [round(e["dt"]) for e in events if e["name"] == "longtask"]
    visible = answer.answer_to_visible_ms
    parts = ", ".join(f"{name} {sum(d):.0f} ms x{len(d)}" for name, d in calls.items())
    line = (f"probe: {what}: {answer.payload_bytes / 1e3:.0f} KB, answer to visible "
            f"{'n/a' if visible is None else f'{visible:.0f} ms'}; {extra}; {parts}; long tasks {longtasks}")
    print(line)
    return line


def polygon(cx: float, cy: float, r: float, vertices: int) -> list[list[float]]:
    """A regular polygon in percent of the image, lightly jagged so no vertex is redundant."""
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    radius = r * (1 + 0.05 * np.cos(7 * angles))
    return np.round(np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1), 4).tolist()


def polygon_answer(template: dict, parts: int, vertices: int, size: tuple[int, int], area: float = 0.01) -> dict:
    """`parts` polygon regions of `vertices` each on a grid, each `area` % of the image."""
    cols = int(np.ceil(np.sqrt(parts)))
    r = np.sqrt(area * 100 / np.pi)  # percent of the side: pi r^2 = area % of 100 x 100
    regions = []
    for i in range(parts):
        cx, cy = 10 + 80 * ((i % cols) + 0.5) / cols, 10 + 80 * ((i // cols) + 0.5) / cols
        regions.append({"id": uuid.uuid4().hex[:10], "from_name": "poly", "to_name": "image", "type": "polygonlabels",
                        "original_width": size[0], "original_height": size[1], "image_rotation": 0,
                        "value": {"points": polygon(cx, cy, r, vertices), "closed": True, "polygonlabels": ["Object"]},
                        "score": 0.9, "readonly": False})
    return {**template, "data": {**template["data"], "result": regions}}


def brush_answer(template: dict, mask: np.ndarray, label: str) -> dict:
    height, width = mask.shape
    region = {"id": uuid.uuid4().hex[:10], "from_name": "defect", "to_name": "image", "type": "brushlabels",
              "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}, "score": 0.9,
              "readonly": False}
    return {**template, "data": {**template["data"], "result": [region]}}


class Answers:
    """Serves the next answer to the page's interactive-annotating call (None: the real backend's)."""

    def __init__(self, page):
        self.next: dict | None = None
        page.route("**/interactive-annotating**", self.handle)

    def handle(self, route):
        if self.next is None:
            route.continue_()
        else:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(self.next))


TEMPLATE = {"data": {"result": [], "score": 0.9, "model_version": "probe"}}


class Clicker:
    """Smart keypoint clicks, each measured: the editor's answer-to-visible (wall clock), the main
    thread's CPU time from the click to visible (Chromium's ThreadTime metric: what the page did,
    whatever else the machine ran) and, for a brush answer, until its mask image has loaded and a
    frame has been painted after it."""

    def __init__(self, page, editor: Editor, name: str, label: str):
        self.page, self.editor, self.name, self.label = page, editor, name, label
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Performance.enable")
        self.i = 0

    def metrics(self) -> dict:
        return {m["name"]: m["value"] for m in self.cdp.send("Performance.getMetrics")["metrics"]}

    def click(self, what: str, mask_image: bool = False, negative: bool = False, at=None) -> str:
        self.editor.select_label(self.name, self.label)
        fx, fy = at or (0.3 + 0.05 * (self.i % 8), 0.3 + 0.05 * (self.i // 8 % 8))
        self.i += 1
        before = self.metrics()
        answer = self.editor.click(fx, fy, negative=negative)
        extra = ""
        if mask_image:
            self.page.wait_for_function("() => window.__probe.some(e => e.name === 'mask image load')", timeout=120_000)
            painted = self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))")
            end = self.page.evaluate("() => { const e = performance.getEntriesByType('resource')"
                                     ".filter(e => e.name.includes('interactive-annotating')); return e[e.length - 1].responseEnd; }")
            loaded = [e for e in self.page.evaluate("window.__probe") if e["name"] == "mask image load"][-1]
            extra = f"mask image loaded +{loaded['t0'] + loaded['dt'] - end:.0f} ms, painted after it +{painted - end:.0f} ms; "
        after = self.metrics()
        cpu = {k: (after[k] - before[k]) * 1000 for k in ("ThreadTime", "ScriptDuration", "LayoutDuration", "TaskDuration")}
        return breakdown(self.page, answer, what, extra + "main thread CPU {ThreadTime:.0f} ms (script {ScriptDuration:.0f}, "
                         "layout {LayoutDuration:.0f}, tasks {TaskDuration:.0f})".format(**cpu))


def _served_editor(label_studio, page_backend, probed, config_name: str, image: tuple, label: str):
    """A project of that config with one uploaded image, the backend connected, its task open in the
    editor with Auto-Annotation and the smart keypoint on; the page's answers are served by `Answers`."""
    config_path = ROOT / "label_config" / config_name
    project = create_project(label_studio, config_path)
    task = upload(label_studio, project["id"], *image)
    connect(label_studio, page_backend, project["id"])
    answers = Answers(probed)
    editor = Editor(probed, label_studio.url, config_path.read_text())
    editor.open(project["id"], task["id"])
    editor.auto_annotation(True)
    editor.smart_tool("key-point-tool")
    return answers, Clicker(probed, editor, "kp", label)


def test_polygon_answers_per_region_or_per_vertex(label_studio, page_backend, probed):
    answers, clicker = _served_editor(label_studio, page_backend, probed, "single_object_polygon.xml",
                                      ("photo.png", make_image(SIDE, SIDE, seed=5), "image/png"), "Object")
    answers.next = polygon_answer(TEMPLATE, 1, 10, (SIDE, SIDE))
    clicker.click("warm-up")
    cases = [(1, 10), (1, 1000), (5, 10), (5, 200), (20, 10), (20, 50), (40, 10)]
    for _ in range(3):
        for parts, vertices in cases:
            answers.next = polygon_answer(TEMPLATE, parts, vertices, (SIDE, SIDE))
            clicker.click(f"polygon {parts} regions x {vertices} vertices")
    answers.next = polygon_answer(TEMPLATE, 1, 50, (SIDE, SIDE), area=40.0)
    clicker.click("polygon 1 region x 50 vertices, 40 % of the image")
    answers.next = polygon_answer(TEMPLATE, 20, 50, (SIDE, SIDE), area=3.0)
    clicker.click("polygon 20 regions x 50 vertices, 3 % each")  # (before this fix: 0.4 % and 0.03 %)


def test_alt_click_answers(label_studio, page_backend, probed):
    """The browser test's keypoint + Alt-click answer costs the page more than its keypoint or box
    answer whatever its regions: the same answers after a plain click and after an Alt-click."""
    answers, clicker = _served_editor(label_studio, page_backend, probed, "single_object_polygon.xml",
                                      ("photo.png", make_image(SIDE, SIDE, seed=6), "image/png"), "Object")
    answers.next = polygon_answer(TEMPLATE, 1, 10, (SIDE, SIDE))
    clicker.click("warm-up")
    for _ in range(3):
        for parts in (1, 5, 20):
            for negative in (False, True):
                answers.next = polygon_answer(TEMPLATE, parts, 40, (SIDE, SIDE))
                clicker.click(f"polygon {parts} regions x 40 vertices after {'an Alt-click' if negative else 'a click'}",
                              negative=negative)


def test_a_20_mp_brush_answer_bytes_or_pixels(label_studio, page_backend, probed):
    answers, clicker = _served_editor(label_studio, page_backend, probed, "surface_defects_brush.xml",
                                      ("screen.jpg", synthetic_jpeg(BIG, seed=11), "image/jpeg"), "Scratch")
    width, height = BIG
    yy, xx = np.ogrid[0:height, 0:width]
    disc = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) <= (0.2 * height) ** 2
    rng = np.random.default_rng(3)
    low = cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), 1.2)
    ragged = cv2.resize(low, (width, height), interpolation=cv2.INTER_LINEAR) > 0
    tiny = np.zeros((height, width), bool)
    tiny[100:110, 100:110] = True
    bodies = {name: brush_answer(TEMPLATE, mask, "Scratch") for name, mask in
              [("smooth disc, 13 % on", disc), ("ragged, %.0f %% on" % (ragged.mean() * 100), ragged),
               ("10x10 px", tiny)]}
    for _ in range(2):
        for name, body in bodies.items():
            answers.next = body
            clicker.click(f"20 MP brush, {name}", mask_image=True)
