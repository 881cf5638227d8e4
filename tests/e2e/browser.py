"""Label Studio's labeling page driven in a real headless Chromium (Debian's) through Playwright for
Python, as an annotator uses it. Selectors come from Label Studio 1.23.2's editor source
(web/libs/editor: data-testid attributes of the bottom bar, tool buttons' aria-labels, BEM class names)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}

# Records, for each suggestions answer, when the page had drawn it: the editor shows "N suggestions"
# once it has turned the answer into regions; the second animation frame after that is the first one
# painted with them (a frame runs only when the main thread is free, so drawing time is included).
SUGGESTIONS_WATCH = """
(() => {
  window.__shown = [];
  let last = null;
  const look = () => {
    const info = document.querySelector('.lsf-auto-accept__info');
    const text = info ? info.textContent : null;
    // rearmed once an answer has arrived: an answer with as many regions as the last one leaves the
    // text as it was, so its first painted frame after the answer counts instead
    if (text && (text !== last || window.__rearm)) {
      window.__rearm = false;
      const seen = performance.now();
      requestAnimationFrame(() => requestAnimationFrame(() =>
        window.__shown.push({text, seen, painted: performance.now()})));
    }
    last = text;
    requestAnimationFrame(look);
  };
  requestAnimationFrame(look);
})();
"""


def chromium_missing() -> str | None:
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)"
    return None


def labels_controls(config_xml: str) -> list[tuple[str, str, list[str]]]:
    """(tag, name, labels) of each *Labels control in document order: the editor draws one
    `.lsf-labels` group per control, in this order."""
    found = []
    for element in ElementTree.fromstring(config_xml).iter():
        if element.tag.endswith("Labels"):
            found.append((element.tag, element.get("name"), [label.get("value") for label in element.iter("Label")]))
    return found


@dataclass
class Answer:
    """One suggestions round trip as the page saw it."""
    context: dict
    body: dict
    payload_bytes: int
    answer_to_visible_ms: float | None = None
    # the page's main-thread CPU time from the click to visible (Chromium's ThreadTime): what the
    # page itself did, nearly independent of what else the machine runs (the wall time is not)
    page_cpu_ms: float | None = None


@dataclass
class Editor:
    """The labeling page of one task."""
    page: object
    ls_url: str
    config_xml: str
    answers: list[Answer] = field(default_factory=list)

    def open(self, project_id: int, task_id: int) -> None:
        self.page.goto(f"{self.ls_url}/projects/{project_id}/data?task={task_id}")
        self.page.wait_for_selector("[data-testid=bottombar-submit-button]", state="attached", timeout=90_000)
        self.image().wait_for(state="visible", timeout=90_000)
        # the image element gets its displayed size once the picture is decoded
        self.page.wait_for_function("() => { const i = document.querySelector('img[alt=image]');"
                                    " return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 50; }",
                                    timeout=120_000)

    def image(self):
        return self.page.locator("img[alt=image]")

    def auto_annotation(self, on: bool = True) -> None:
        toggle = self.page.locator("[data-testid=bottombar-auto-annotation-toggle]")
        if toggle.is_checked() != on:
            toggle.click()
        assert toggle.is_checked() == on

    def smart_tool(self, aria_label: str) -> None:
        """Pick a smart tool in the toolbar's Auto-Detect group (`key-point-tool`, `rectangle-tool`)."""
        tool = self.page.locator(f"button.lsf-tool_smart[aria-label={aria_label}]")
        if tool.count() == 0 or "lsf-tool_active" not in (tool.first.get_attribute("class") or ""):
            # the group's button selects the first smart tool; the others sit in its flyout
            self.page.locator("button.lsf-tool_smart:not([aria-label])").click()
            if "lsf-tool_active" not in (tool.first.get_attribute("class") or ""):
                tool.first.dispatch_event("click")
        self.page.wait_for_function(
            f"() => document.querySelector('button.lsf-tool_smart.lsf-tool_active[aria-label={aria_label}]') !== null",
            timeout=10_000)

    def select_label(self, control_name: str, label: str) -> None:
        """Click `label` of the control `control_name` (a no-op when it is already selected)."""
        names = [name for _, name, _ in labels_controls(self.config_xml)]
        chip = self.page.locator(".lsf-labels").nth(names.index(control_name)).locator(".lsf-label", has_text=label)
        if "lsf-label_selected" not in (chip.get_attribute("class") or ""):
            chip.click()
        self.page.wait_for_function(
            "([i, label]) => { const g = document.querySelectorAll('.lsf-labels')[i];"
            " return [...g.querySelectorAll('.lsf-label_selected')].some(l => l.textContent.includes(label)); }",
            arg=[names.index(control_name), label], timeout=10_000)

    def label_selected(self, control_name: str) -> bool:
        names = [name for _, name, _ in labels_controls(self.config_xml)]
        return self.page.locator(".lsf-labels").nth(names.index(control_name)).locator(".lsf-label_selected").count() > 0

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        """Screen coordinates of a point given as a fraction of the displayed image."""
        box = self.image().bounding_box()
        return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy

    def _thread_time(self) -> float:
        if getattr(self, "_cdp", None) is None:
            self._cdp = self.page.context.new_cdp_session(self.page)
            self._cdp.send("Performance.enable")
        metrics = self._cdp.send("Performance.getMetrics")["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "ThreadTime") * 1000

    def _await_answer(self, act, timeout: float) -> Answer:
        shown_before = self.page.evaluate("window.__shown.length")
        cpu_before = self._thread_time()
        with self.page.expect_request(lambda r: "interactive-annotating" in r.url, timeout=timeout * 1000) as sent:
            with self.page.expect_response(lambda r: "interactive-annotating" in r.url,
                                           timeout=timeout * 1000) as answered:
                act()
        response = answered.value
        assert response.status == 200, response.text()
        raw = response.body()
        answer = Answer(context=json.loads(sent.value.post_data)["context"], body=json.loads(raw),
                        payload_bytes=len(raw))
        self.answers.append(answer)
        if answer.body.get("data", {}).get("result"):
            # the editor shows the count of what it drew; then the second frame after it is painted
            if self.page.evaluate(f"window.__shown.length == {shown_before}"):
                self.page.evaluate("window.__rearm = true")
            self.page.wait_for_function(f"() => window.__shown.length > {shown_before}", timeout=timeout * 1000)
            shown = self.page.evaluate("window.__shown")[-1]
            answered_at = self.page.evaluate(
                "() => { const e = performance.getEntriesByType('resource')"
                ".filter(e => e.name.includes('interactive-annotating')); return e[e.length - 1].responseEnd; }")
            answer.answer_to_visible_ms = shown["painted"] - answered_at
            answer.page_cpu_ms = self._thread_time() - cpu_before
        return answer

    def click(self, fx: float, fy: float, negative: bool = False, timeout: float = 120) -> Answer:
        """A smart keypoint click (Alt-click: a negative point) and the suggestions it brings."""
        x, y = self.at(fx, fy)

        def act():
            if negative:
                self.page.keyboard.down("Alt")
            try:
                self.page.mouse.click(x, y)
            finally:
                if negative:
                    self.page.keyboard.up("Alt")

        return self._await_answer(act, timeout)

    def drag(self, f0: tuple[float, float], f1: tuple[float, float], timeout: float = 120) -> Answer:
        """A smart rectangle dragged from one corner to the other."""
        x0, y0 = self.at(*f0)
        x1, y1 = self.at(*f1)

        def act():
            self.page.mouse.move(x0, y0)
            self.page.mouse.down()
            self.page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
            self.page.mouse.move(x1, y1, steps=4)
            self.page.mouse.up()

        return self._await_answer(act, timeout)

    def suggestions(self) -> int:
        info = self.page.locator(".lsf-auto-accept__info")
        if info.count() == 0:
            return 0
        return int(info.inner_text().split()[0])

    def accept(self) -> None:
        self.page.locator("[data-testid=bottombar-accept-suggestions-button]").click()
        self.page.locator(".lsf-auto-accept__info").wait_for(state="detached", timeout=60_000)

    def regions_listed(self) -> int:
        """Regions in the outliner (right panel)."""
        return self.page.locator(".lsf-outliner-item").count()

    def submit(self) -> dict:
        with self.page.expect_response(lambda r: r.url.split("?")[0].endswith("/annotations")
                                       and r.request.method == "POST", timeout=120_000) as created:
            self.page.locator("[data-testid=bottombar-submit-button]").click()
        assert created.value.status == 201, created.value.text()
        return created.value.json()


def launch(playwright, user_data_dir: Path):
    """Debian's Chromium with a fresh profile; only Label Studio's own address is reachable (the page
    also asks for fonts, news and analytics on the internet: refused at once instead of timing out)."""
    context = playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
    context.route("**/*", lambda route: route.continue_()
                  if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")) else route.abort())
    context.add_init_script(SUGGESTIONS_WATCH)
    return context


def login(page, ls_url: str, email: str, password: str) -> None:
    """Logs in, unless this browser's session already is (Label Studio then redirects the login page)."""
    page.goto(f"{ls_url}/user/login/")
    if "/user/login" not in page.url:
        return
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000, wait_until="commit")


def wait_until(predicate, timeout: float, what: str, every: float = 1.0):
    """Polls `predicate` (a Label Studio API call, say) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
