"""`sam-backend doctor --project ID`: in order, everything that makes Label Studio's smart tools do
nothing or drafts never appear, each check OK or FAIL with what to change. Exit 1 on any FAIL.

Run it with the backend's own environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, REDIS_URL,
ALLOWED_IMAGE_HOSTS, ...): the image and Redis checks use this process's settings, the connection
and interactive checks go through Label Studio to the backend it has registered.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid

import redis
from label_studio_sdk.label_interface import LabelInterface
from rq import Worker

from backend.commands.connect import config_problems, hidden_drafts, refused_image_hosts
from backend.errors import BackendError, UnservableConfig
from backend.jobs.queues import PRELABEL_QUEUE, QUEUES, RISK_PERSISTENCE, TRAIN_QUEUE, WARM_QUEUE, store_risk_kinds
from backend.labelstudio.client import LabelStudioApi
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.prompts import task_image_url
from backend.pipeline.images import ImageFetcher, decode_image, display_url
from backend.settings import Settings
from backend.web.embedded_redis import EmbeddedRedis

OK, FAIL, WARN, SKIP = "OK", "FAIL", "WARN", "SKIP"
# Label Studio waits ML_TIMEOUT_PREDICT (100 s) for the backend; the first click on an image waits
# for the encoder (vit_b ~25 s on a CPU, vit_h minutes)
INTERACTIVE_TIMEOUT = 180.0
# each check's line, also when a Label Studio call fails inside it (a refused token fails the first check
# under its own name, not under the method's)
CHECKS = {
    "label_studio": "Label Studio reachable with the token",
    "registered": "backend registered with the project",
    "reachable": "backend reachable from Label Studio (/health, /setup)",
    "interactive_on": "interactive preannotations on",
    "label_config": "label config usable by the smart tools",
    "drafts_shown": "editor pre-fills our drafts",
    "first_image": "first task's image downloadable by the backend",
    "interactive_call": "a smart-tool click through Label Studio returns a region",
    "workers": "workers listening for drafts",
    "job_store": "Redis writable, queues safe from eviction",
}


@dataclasses.dataclass
class Finding:
    status: str
    check: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.check}: {self.detail}"


class Doctor:
    def __init__(self, settings: Settings, project_id: int, url: str | None, out=sys.stdout):
        self.settings = settings
        self.project_id = project_id
        self.url = url.rstrip("/") if url else None
        self.out = out
        self.findings: list[Finding] = []
        self.api: LabelStudioApi | None = None
        self.project = None
        self.backend: dict | None = None
        self.task: dict | None = None
        self.size: tuple[int, int] | None = None  # (width, height) of the first task's image

    def note(self, status: str, check: str, detail: str) -> None:
        finding = Finding(status, check, detail)
        self.findings.append(finding)
        print(finding.line(), file=self.out, flush=True)

    def run(self) -> int:
        for check in (self.label_studio, self.registered, self.reachable, self.interactive_on, self.label_config,
                      self.drafts_shown, self.first_image, self.interactive_call, self.workers, self.job_store):
            try:
                check()
            except BackendError as exc:  # a Label Studio call that failed mid-check: the check fails, others run
                self.note(FAIL, CHECKS[check.__name__], exc.message)
        failed = [f for f in self.findings if f.status == FAIL]
        print(f"{len(failed)} check(s) failed" if failed else "every check passed", file=self.out)
        return 1 if failed else 0

    # ---------------------------------------------------------------- Label Studio and the backend

    def label_studio(self) -> None:
        what = CHECKS["label_studio"]
        if not self.settings.label_studio_url or not self.settings.label_studio_api_key:
            self.note(FAIL, what, "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the backend needs them for images "
                                  "on Label Studio and for drafts; doctor for every check below)")
            return
        api = LabelStudioApi.from_settings(self.settings)
        self.project = api.project(self.project_id)
        self.api = api  # only once it answered: with a refused token, the checks that need it are skipped
        self.note(OK, what, f"project {self.project_id} {self.project.title!r} at {self.settings.label_studio_url}")

    def registered(self) -> None:
        what = CHECKS["registered"]
        if self.api is None:
            return self.note(SKIP, what, "Label Studio not reachable")
        backends = self.api.ml_backends(self.project_id)
        connect = f"sam-backend connect --project {self.project_id} --url <this backend's URL as Label Studio reaches it>"
        if not backends:
            return self.note(FAIL, what, f"no ML backend is connected to project {self.project_id}: run {connect}")
        if self.url:
            matching = [b for b in backends if (b.get("url") or "").rstrip("/") == self.url]
            if not matching:
                listed = ", ".join(b.get("url") or "?" for b in backends)
                return self.note(FAIL, what, f"no ML backend of project {self.project_id} has the URL {self.url} "
                                             f"(registered: {listed}): run {connect}")
            backends = matching
        interactive = [b for b in backends if b.get("is_interactive")]
        self.backend = (interactive or backends)[0]
        others = "" if len(backends) == 1 else f" ({len(backends)} backends: give --url to check another)"
        self.note(OK, what, f"ML backend #{self.backend['id']} {self.backend.get('title')!r} at "
                            f"{self.backend.get('url')}{others}")

    def reachable(self) -> None:
        what = CHECKS["reachable"]
        if self.backend is None:
            return self.note(SKIP, what, "no backend registered")
        checked = self.api.checked_ml_backend(self.backend["id"])  # Label Studio calls /health and /setup now
        self.backend = checked
        state, version = checked.get("readable_state"), checked.get("model_version") or ""
        if state != "Connected":
            reason = checked.get("error_message") or "no answer"
            return self.note(FAIL, what, f"Label Studio sees the backend at {checked.get('url')} as {state}: "
                                         f"{reason}. Start the backend; the URL must be one Label Studio's machine "
                                         "reaches (curl <url>/health there); for a local address start Label Studio "
                                         "with LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false and "
                                         "LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false; with BASIC_AUTH_USER/PASS set, "
                                         "run connect again so Label Studio has them")
        if not version.startswith("sam-"):
            return self.note(FAIL, what, f"the service at {checked.get('url')} answers, but with model version "
                                         f"{version!r}: it is not sam-backend (check the URL and port)")
        self.note(OK, what, f"Connected, model version {version}")

    def interactive_on(self) -> None:
        what = CHECKS["interactive_on"]
        if self.backend is None:
            return self.note(SKIP, what, "no backend registered")
        if not self.backend.get("is_interactive"):
            return self.note(FAIL, what, "off: Label Studio never sends smart-tool clicks to the backend. Run "
                                         f"sam-backend connect --project {self.project_id} again (it turns it on), "
                                         "or Settings -> Model -> edit the model -> Interactive preannotations")
        self.note(OK, what, "on")

    def label_config(self) -> None:
        what = CHECKS["label_config"]
        if self.project is None:
            return self.note(SKIP, what, "Label Studio not reachable")
        problems = config_problems(self.project.label_config or "")
        if problems:
            return self.note(FAIL, what, "; ".join(problems))
        config = parse_label_config(self.project.label_config)
        self.note(OK, what, f"smart {', '.join(config.prompt_tags)} -> "
                            f"{', '.join(f'{o.name} ({o.kind})' for o in config.outputs)}")

    def drafts_shown(self) -> None:
        what = CHECKS["drafts_shown"]
        if self.backend is None:
            return self.note(SKIP, what, "no backend registered")
        why = hidden_drafts(self.api, self.api.project(self.project_id), self.backend)
        if why:
            return self.note(FAIL, what, why)
        self.note(OK, what, f"model version {self.project.model_version!r}")

    # ---------------------------------------------------------------- the first task

    def first_image(self) -> None:
        what = CHECKS["first_image"]
        if self.project is None:
            return self.note(SKIP, what, "Label Studio not reachable")
        try:
            config = parse_label_config(self.project.label_config or "")
        except UnservableConfig:
            return self.note(SKIP, what, "the label config names no image to segment")
        self.task = self.api.first_task(self.project_id)
        if self.task is None:
            return self.note(SKIP, what, "the project has no tasks: import images, then run doctor again")
        try:
            url = task_image_url(self.task, config)
            data = ImageFetcher(self.settings).fetch(url)
            image = decode_image(data, self.settings.max_image_pixels)
        except BackendError as exc:
            return self.note(FAIL, what, f"task {self.task['id']}: {exc.message} (HTTP {exc.status} to the page)")
        height, width = image.original_size
        self.size = (width, height)
        self.note(OK, what, f"task {self.task['id']}: {display_url(url)}, {width}x{height}, {len(data):,} bytes")
        refused = refused_image_hosts(self.settings, self.api.tasks(self.project_id), config)
        for count, reason in refused.values():
            self.note(WARN, "other tasks' images", f"{count} task(s): {reason}")

    def interactive_call(self) -> None:
        what = CHECKS["interactive_call"]
        if self.backend is None or self.task is None or config_problems(self.project.label_config or ""):
            return self.note(SKIP, what, "needs a registered backend, a usable label config and a task")
        context = click_context(self.project.label_config, self.size or (1000, 1000))
        started = time.monotonic()
        answer = self.api.interactive(self.backend["id"], self.task["id"], context, INTERACTIVE_TIMEOUT)
        seconds = time.monotonic() - started
        if answer.get("errors"):
            # Label Studio answers the page 200 with this inside: the annotator sees nothing at all
            return self.note(FAIL, what, f"Label Studio passed on the backend's error, which the page never shows: "
                                         f"{'; '.join(map(str, answer['errors']))}")
        regions = (answer.get("data") or {}).get("result") or []
        if not regions:
            return self.note(FAIL, what, f"the answer for task {self.task['id']} holds no region: {answer}")
        kinds = sorted({r.get("type") for r in regions})
        self.note(OK, what, f"{len(regions)} region(s) ({', '.join(kinds)}) for task {self.task['id']} in "
                            f"{seconds:.1f} s")

    # ---------------------------------------------------------------- workers and Redis

    def _job_store(self) -> tuple[redis.Redis | None, str]:
        url = self.settings.redis_url
        if url:
            return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0), url
        embedded = EmbeddedRedis(self.settings.model_dir / "redis", maxmemory=None, name="jobs")
        if embedded.socket.exists():  # `sam-backend serve` without REDIS_URL, on this machine
            return redis.Redis.from_url(embedded.url, socket_timeout=5.0), embedded.url
        return None, ""

    def workers(self) -> None:
        what = CHECKS["workers"]
        connection, url = self._job_store()
        if connection is None:
            return self.note(FAIL, what, "REDIS_URL is not set and no embedded Redis of `sam-backend serve` is in "
                                         f"{self.settings.model_dir / 'redis'}: set REDIS_URL to the backend's")
        try:
            workers = Worker.all(connection=connection)
        except redis.RedisError as exc:
            return self.note(FAIL, what, f"cannot read the workers from the job store's Redis: {exc}")
        listening = {name: [w for w in workers if name in w.queue_names()] for name in QUEUES}
        missing = [name for name in (WARM_QUEUE, PRELABEL_QUEUE) if not listening[name]]
        if missing:
            return self.note(FAIL, what, f"no RQ worker listens on {', '.join(missing)} in the job store's Redis: "
                                         "drafts (Retrieve predictions, opening a task) and warming are queued but "
                                         "never made. Run `sam-backend worker` with the backend's REDIS_URL, or "
                                         "`sam-backend serve` with WARM_WORKERS >= 1")
        hosts = sorted({w.hostname for w in workers if w.hostname})
        self.note(OK, what, f"{len(listening[PRELABEL_QUEUE])} on {PRELABEL_QUEUE}, {len(listening[WARM_QUEUE])} on "
                            f"{WARM_QUEUE} ({', '.join(hosts)})")
        if not listening[TRAIN_QUEUE]:
            self.note(WARN, "training worker", f"no worker listens on {TRAIN_QUEUE}: \"Start training\" queues runs "
                                               "that never start")

    def job_store(self) -> None:
        what = CHECKS["job_store"]
        connection, url = self._job_store()
        if connection is None:
            return self.note(SKIP, what, "no job store to check")
        key = f"sam-backend:doctor:{uuid.uuid4().hex}"
        try:
            connection.set(key, "1", ex=60)
            written = connection.get(key) == b"1"
            connection.delete(key)
        except redis.RedisError as exc:
            return self.note(FAIL, what, f"cannot write to the job store's Redis: {exc}")
        if not written:
            return self.note(FAIL, what, "a key written to the job store's Redis did not read back")
        shares = not self.settings.cache_redis_url or self.settings.cache_redis_url == self.settings.redis_url
        risks = store_risk_kinds(connection, shares_cache=bool(self.settings.redis_url) and shares)
        evicting = [message for kind, message in risks if kind != RISK_PERSISTENCE]
        if evicting:
            return self.note(FAIL, what, "; ".join(evicting))
        self.note(OK, what, "writable, never evicts")
        for kind, message in risks:
            if kind == RISK_PERSISTENCE:
                self.note(WARN, "job store persistence", message)


def click_context(label_config: str, size: tuple[int, int]) -> dict:
    """What a smart tool sends for a click in the middle of the image (a keypoint if the config has a
    smart KeyPointLabels, else a box), with its first label that an output tag also has."""
    config = parse_label_config(label_config)
    interface = LabelInterface(label_config)
    width, height = size
    controls = [interface.get_control(name) for name in config.prompt_tags]
    control = next((c for c in controls if c.tag == "KeyPointLabels"), controls[0])
    label = next(lb for lb in control.labels if any(lb in o.labels for o in config.outputs))
    base = {"id": "doctor", "from_name": control.name, "to_name": config.image_name, "original_width": width,
            "original_height": height, "image_rotation": 0, "origin": "manual"}
    if control.tag == "KeyPointLabels":
        region = dict(base, type="keypointlabels", is_positive=True,
                      value={"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": [label]})
    else:
        region = dict(base, type="rectanglelabels",
                      value={"x": 30.0, "y": 30.0, "width": 40.0, "height": 40.0, "rotation": 0,
                             "rectanglelabels": [label]})
    return {"result": [region]}


def doctor(settings: Settings, project_id: int, url: str | None, out=sys.stdout) -> int:
    return Doctor(settings, project_id, url, out).run()
