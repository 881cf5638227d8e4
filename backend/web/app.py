"""create_app(settings): the Flask app Label Studio talks to. Routes, basic auth, and the one error mapping."""

from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.errors import BackendError, Busy, InvalidRequest, Unauthorized
from backend.labelstudio.protocol import BatchRequest, parse_predict, project_number
from backend.pipeline.timings import Timings
from backend.services import Services
from backend.settings import Settings
from backend.web.fast_json import FastJSONProvider

log = logging.getLogger(__name__)

# the actions Label Studio 1.23 sends to webhooks; anything else is counted and logged as "other"
WEBHOOK_ACTIONS = frozenset((
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED", "START_TRAINING",
))


def batch_answer(services: Services, request: BatchRequest) -> list[dict]:
    """One entry per task, in task order (Label Studio drops the whole answer otherwise).

    Drafts take seconds to minutes on a CPU, so none is made here: each task gets a pre-label job
    (sam-prelabel queue) that embeds the image, drafts it and posts the prediction to Label Studio
    itself. The entries carry no "result": Label Studio skips them without storing an empty
    prediction, which would stop it from asking again for this model version.
    """
    settings, project_id = services.settings, request.project_id
    status = "no draft: PRELABEL_ON_PREDICT is off"
    if settings.prelabel_on_predict:
        # a hint, not a mandate: one request queues at most MAX_TASKS_PER_REQUEST jobs
        task_ids = list(dict.fromkeys(t["id"] for t in request.tasks if isinstance(t.get("id"), int)
                                      and not isinstance(t.get("id"), bool)))
        if len(task_ids) > settings.max_tasks_per_request:
            log.warning("batch of %d tasks: queueing the first %d (MAX_TASKS_PER_REQUEST); "
                        "`sam-backend prelabel --project ID` drafts a whole project", len(task_ids),
                        settings.max_tasks_per_request)
            task_ids = task_ids[:settings.max_tasks_per_request]
        if project_id is not None and task_ids:
            services.background.prelabel(project_id, task_ids)
            status = "draft queued"
            if len(task_ids) == 1 and settings.prefetch_tasks:  # an annotator opened this task
                services.background.prefetch(project_id, task_ids[0], settings.prefetch_tasks)
        else:
            services.background.warm_tasks(tasks_to_warm(request.tasks, settings.max_tasks_per_request),
                                           request.config)
            status = "no draft without a project id; image embedding queued"
    pending = {"model_version": services.predictor.model_version(project_id), "score": 0.0, "status": status}
    return [dict(pending) for _ in request.tasks]


def require_auth(settings: Settings) -> None:
    if not settings.basic_auth_enabled:
        return
    auth = request.authorization
    ok = (
        auth is not None
        and auth.type == "basic"
        and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    )
    if not ok:
        raise Unauthorized("basic auth required: set the same user and password in Label Studio's model settings")


def require_webhook_secret(settings: Settings) -> None:
    """Project webhooks come without basic auth (Label Studio's design): with WEBHOOK_SECRET set,
    they must carry it in a header (Label Studio: the webhook's "Headers")."""
    secret = settings.webhook_secret
    given = request.headers.get("X-Webhook-Secret", "")
    if secret and not hmac.compare_digest(given.encode("utf-8", "replace"), secret.encode()):
        raise Unauthorized("webhook secret missing or wrong: add the header X-Webhook-Secret to the "
                           "project's webhook in Label Studio (Settings -> Webhooks)")


# Label Studio's bodies nest about 8 levels deep (task data a few more); deeper ones are refused
# before anything walks them: a repr() in an error message or a serialiser recursing past
# Python's limit was a 500
MAX_JSON_DEPTH = 100


def json_depth_over(value, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (iterative: it must not recurse itself)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return False


def json_body() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # the JSON decoder's own limit, reached by a hostile body
        body = None
        nested = True
    else:
        nested = json_depth_over(body, MAX_JSON_DEPTH)
    if nested:
        raise InvalidRequest(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object (Content-Type: application/json)")
    return body


def tasks_to_warm(tasks: list, cap: int) -> list[dict]:
    """Payloads are hints: task objects with an integer id, each once, at most `cap` of them."""
    unique = {}
    for task in tasks:
        task_id = task.get("id") if isinstance(task, dict) else None
        if isinstance(task_id, int) and not isinstance(task_id, bool) and task_id not in unique:
            unique[task_id] = task
            if len(unique) == cap:
                break
    return list(unique.values())


def webhook_answer(services: Services, body: dict) -> dict:
    """Acknowledge a webhook at once (Label Studio waits 1 s); queue what it hints at, never more
    than MAX_TASKS_PER_REQUEST jobs, and never train inline."""
    action = body.get("action")
    if not isinstance(action, str):
        raise InvalidRequest("webhook body has no 'action'")
    if action == "START_TRAINING":
        require_auth(services.settings)  # sent by the ML connector with basic auth; project webhooks come without
    else:
        require_webhook_secret(services.settings)
    # a known action or "other": label values and log lines never carry what a caller made up
    known = action if action in WEBHOOK_ACTIONS else "other"
    services.metrics.webhooks.labels(known).inc()
    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    project_id = project.get("id") if isinstance(project.get("id"), int) and not isinstance(
        project.get("id"), bool) else None
    log.info("webhook %s for project %s", known, project_id)
    answer = {"status": "ok", "action": known}
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED") and project_id is not None:
        # count it; every TRAIN_AFTER_ANNOTATIONS a training run is queued
        answer["training"] = services.background.train(project_id, "annotation")
    elif action == "START_TRAINING" and project_id is not None:
        answer["training"] = services.background.train(project_id, "start_training")
    if action == "TASKS_CREATED" and isinstance(body.get("tasks"), list) and project_id is not None:
        # newly imported images: embed them before an annotator opens them. The payload names the
        # tasks, nothing more: a job reads them (and the label config) from Label Studio with the
        # backend's own token, so a forged webhook can neither choose what is downloaded nor queue
        # tasks the project does not have
        cap = services.settings.max_tasks_per_request
        task_ids = [task["id"] for task in tasks_to_warm(body["tasks"], cap)]
        if len(body["tasks"]) > cap:
            log.warning("TASKS_CREATED with %d tasks: warming at most %d (MAX_TASKS_PER_REQUEST); "
                        "`sam-backend warm --project ID` embeds a whole project", len(body["tasks"]), cap)
        if task_ids:
            answer["tasks"] = len(task_ids)
            answer["queued"] = services.background.warm_created(project_id, task_ids)
    return answer


def register_error_mapping(app: Flask) -> None:
    """The one place errors become answers: typed errors with their status, HTTP errors as JSON,
    anything else a 500 that names only the exception's class (details go to the log)."""

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        response = jsonify({"status": "error", "error": exc.message})
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Basic realm="sam-backend"'
        if isinstance(exc, Busy):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description
        if isinstance(exc, RequestEntityTooLarge):
            message = f"the request body is larger than MAX_REQUEST_BYTES={app.config['MAX_CONTENT_LENGTH']}"
        return jsonify({"status": "error", "error": message}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify({"status": "error", "error": f"internal error: {exc.__class__.__name__}"}), 500


def create_app(settings: Settings | None = None, services: Services | None = None, preload: bool = True) -> Flask:
    settings = settings or (services.settings if services else Settings.from_env())
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = services or Services.build(settings)
    if preload:
        services.loader.preload()

    app = Flask("sam_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies: 413
    app.json = FastJSONProvider(app)  # compact, keys in the order written
    app.extensions["sam"] = services
    register_error_mapping(app)

    @app.before_request
    def start_timer():
        g.start = time.perf_counter()

    @app.after_request
    def observe(response: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        services.metrics.requests.labels(route, str(response.status_code)).observe(time.perf_counter() - g.start)
        return response

    @app.get("/health")
    @app.get("/")
    def health():
        if services.loader.error:
            return jsonify({"status": "ERROR", "model_class": "SamBackend", "error": services.loader.error}), 503
        return jsonify({"status": "UP", "model_class": "SamBackend", "model_version": services.loader.model_version})

    @app.post("/setup")
    def setup():
        require_auth(settings)
        body = json_body()
        hostname, token = body.get("hostname"), body.get("access_token")
        if isinstance(hostname, str) and isinstance(token, str):
            # both end up in request headers: unprintable text, or a token that is not ASCII, would
            # fail every later download with a 500
            if not hostname.isprintable():
                raise InvalidRequest("/setup's hostname must be printable text")
            if not (token.isprintable() and token.isascii()):
                raise InvalidRequest("/setup's access_token must be printable ASCII text")
            services.share_setup(hostname, token)
        return jsonify({"model_version": services.predictor.model_version(project_number(body.get("project")))})

    @app.post("/predict")
    def predict():
        require_auth(settings)
        parsed = parse_predict(json_body())
        services.load_shared_setup()
        timings = Timings()
        start = time.perf_counter()
        if isinstance(parsed, BatchRequest):
            results = batch_answer(services, parsed)
        else:
            results = [services.predictor.click(parsed, timings)]
        response = jsonify({"results": results})
        timings.add("total", time.perf_counter() - start)
        response.headers["Server-Timing"] = timings.header()
        return response

    @app.post("/webhook")
    def webhook():
        return jsonify(webhook_answer(services, json_body()))

    @app.get("/metrics")
    def metrics():
        if settings.metrics_auth:
            require_auth(settings)
        return Response(services.metrics.render(), mimetype="text/plain; version=0.0.4")

    return app
