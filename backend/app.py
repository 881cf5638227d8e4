"""create_app(settings): the Flask app Label Studio talks to. Routes, basic auth, and the one error mapping."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time

import redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.embeddings import EmbeddingCache
from backend.errors import BackendError, InvalidRequest, Unauthorized
from backend.images import ImageFetcher
from backend.label_config import parse_label_config
from backend.metrics import Metrics
from backend.model_loader import ModelLoader
from backend.heads import ServingHeads
from backend.jobs import BackgroundJobs, job_counts
from backend.ls_client import LabelStudioApi
from backend.predict import Embedder, Predictor, Timings
from backend.protocol import parse_predict, project_number
from backend.settings import Settings
from backend.training import acceptance_rows
from model.registry import HeadRegistry

log = logging.getLogger(__name__)

_SETUP_KEY = "sam-backend:setup"


@dataclasses.dataclass
class Services:
    settings: Settings
    metrics: Metrics
    loader: ModelLoader
    cache: EmbeddingCache
    fetcher: ImageFetcher
    embedder: Embedder
    predictor: Predictor
    redis: redis.Redis | None

    @classmethod
    def build(cls, settings: Settings, loader: ModelLoader | None = None) -> "Services":
        metrics = Metrics()
        client = None
        if settings.redis_url:
            # short timeouts: an unreachable Redis must cost a click milliseconds, not seconds
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        else:
            log.warning("REDIS_URL is not set: embeddings are cached in this process only")
        loader = loader or ModelLoader(settings)
        cache = EmbeddingCache(
            client, metrics, settings.embedding_ttl, settings.embedding_lru_size, settings.url_digest_ttl
        )
        fetcher = ImageFetcher(settings)
        embedder = Embedder(settings, loader, cache, fetcher, metrics)

        heads = ServingHeads(HeadRegistry(settings.head_registry_dir), lambda: loader.model_id, metrics,
                             settings.head_reload_seconds)
        predictor = Predictor(settings, loader, embedder, metrics, BackgroundJobs(client, loader, metrics), heads)
        if client is not None:
            metrics.watch_queues(lambda: job_counts(client))
            metrics.watch_acceptance(lambda: acceptance_rows(client))
        return cls(settings, metrics, loader, cache, fetcher, embedder, predictor, client)

    def share_setup(self, hostname: str, token: str) -> None:
        """Other workers and machines did not see this /setup: leave it in Redis for them."""
        self.fetcher.remember_setup(hostname, token)
        if self.redis is None:
            return
        try:
            self.redis.hset(_SETUP_KEY, mapping={"hostname": hostname, "access_token": token})
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not share /setup through Redis: %s", exc)

    def label_studio_api(self) -> LabelStudioApi:
        """Label Studio's API with the configured credentials, else those from /setup."""
        ls = self.fetcher.label_studio()
        if ls is None:
            return LabelStudioApi.from_settings(self.settings)  # raises, naming the variables to set
        return LabelStudioApi(ls.base_url, ls.api_key)

    def load_shared_setup(self) -> None:
        """Label Studio's address and token from another worker's /setup, when none is known here."""
        if self.redis is None or self.fetcher.has_label_studio():
            return
        try:
            shared = self.redis.hgetall(_SETUP_KEY)
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not read the shared /setup from Redis: %s", exc)
            return
        if shared:
            self.fetcher.remember_setup(shared[b"hostname"].decode(), shared[b"access_token"].decode())


def create_app(settings: Settings | None = None, services: Services | None = None, preload: bool = True) -> Flask:
    settings = settings or (services.settings if services else Settings.from_env())
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = services or Services.build(settings)
    if preload:
        services.loader.preload()

    app = Flask("sam_backend")
    app.json.sort_keys = False
    app.json.compact = True
    app.extensions["sam"] = services

    def require_auth() -> None:
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

    def json_body() -> dict:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object (Content-Type: application/json)")
        return body

    @app.before_request
    def start_timer():
        g.start = time.perf_counter()

    @app.after_request
    def observe(response: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        services.metrics.requests.labels(route, str(response.status_code)).observe(time.perf_counter() - g.start)
        return response

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        response = jsonify({"status": "error", "error": exc.message})
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Basic realm="sam-backend"'
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify({"status": "error", "error": exc.description}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify({"status": "error", "error": f"internal error: {exc.__class__.__name__}"}), 500

    @app.get("/health")
    @app.get("/")
    def health():
        if services.loader.error:
            return jsonify({"status": "ERROR", "model_class": "SamBackend", "error": services.loader.error}), 503
        return jsonify({"status": "UP", "model_class": "SamBackend", "model_version": services.loader.model_version})

    @app.post("/setup")
    def setup():
        require_auth()
        body = json_body()
        hostname, token = body.get("hostname"), body.get("access_token")
        if isinstance(hostname, str) and isinstance(token, str):
            services.share_setup(hostname, token)
        project = project_number(str(body["project"])) if body.get("project") is not None else None
        return jsonify({"model_version": services.predictor.model_version(project)})

    @app.post("/predict")
    def predict():
        require_auth()
        parsed = parse_predict(json_body())
        services.load_shared_setup()
        timings = Timings()
        start = time.perf_counter()
        answer = services.predictor.predict(parsed, timings)
        response = jsonify(answer)
        timings.add("total", time.perf_counter() - start)
        response.headers["Server-Timing"] = timings.header()
        return response

    @app.post("/webhook")
    def webhook():
        body = json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise InvalidRequest("webhook body has no 'action'")
        if action == "START_TRAINING":
            require_auth()  # sent by the ML connector with basic auth; project webhooks come without
        services.metrics.webhooks.labels(action).inc()
        project = body.get("project") if isinstance(body.get("project"), dict) else {}
        log.info("webhook %s for project %s", action, project.get("id"))
        answer = {"status": "ok", "action": action}
        project_id = project.get("id") if isinstance(project.get("id"), int) else None
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED") and project_id is not None:
            # count it; every TRAIN_AFTER_ANNOTATIONS a training run is queued (never trained inline: 1 s timeout)
            answer["training"] = services.predictor.background.train(project_id, "annotation", settings)
        elif action == "START_TRAINING" and project_id is not None:
            answer["training"] = services.predictor.background.train(project_id, "start_training", settings)
        if action == "TASKS_CREATED" and isinstance(body.get("tasks"), list):
            # newly imported images: embed them before an annotator opens them
            try:
                config = parse_label_config(project.get("label_config") or "")
            except BackendError as exc:
                log.info("not warming new tasks: %s", exc.message)
            else:
                answer["queued"] = services.predictor.warm_tasks([t for t in body["tasks"] if isinstance(t, dict)], config)
        return jsonify(answer)

    @app.get("/metrics")
    def metrics():
        return Response(services.metrics.render(), mimetype="text/plain; version=0.0.4")

    return app
